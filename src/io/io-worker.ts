/**
 * Entry point of the I/O worker thread (see io-thread.ts).
 */
import { parentPort, workerData } from "node:worker_threads";
import * as sys from "../sys/libc";
import { PollSet } from "../sys/poll-set";
import { GuestMemory } from "../memory/guest-memory";
import { IoReady } from "../devices/virtio/types";
import { IoControlCell, IoWorkerInit, IoWorkerMessage } from "./io-thread";
import { instantiateIoSide, type IoSideDevice } from "../board/virtio-devices";
import { Vm } from "../kvm/kvm";
import { MsiRoutes } from "../kvm/gsi-routing";

// Device models speak IoReady; its bits are poll(2)'s, so they pass through unchanged.
if (
  IoReady.READABLE !== sys.POLLIN ||
  IoReady.WRITABLE !== sys.POLLOUT ||
  IoReady.ERROR !== sys.POLLERR ||
  IoReady.HANGUP !== sys.POLLHUP ||
  IoReady.PEER_CLOSED !== sys.POLLRDHUP
) {
  throw new Error("IoReady and poll(2) disagree");
}

function post(m: IoWorkerMessage): void {
  parentPort!.postMessage(m);
}

/** What a poll slot is. */
const SlotKind = { CONTROL: 0, KICK: 1, RESAMPLE: 2, BACKEND: 3 } as const;

function main(init: IoWorkerInit): void {
  const memory = GuestMemory.attach(init.memory);
  const log = { warn: (message: string) => post({ type: "warning", message }) };
  // This thread owns the VM's GSI routing table: every change re-sends all of it.
  const msiRoutes = new MsiRoutes(new Vm(init.vmFd));
  const devices = init.devices.map((spec, i) => instantiateIoSide(spec, { memory, vmFd: init.vmFd, log, msiRoutes, restored: init.restoredQueues?.[i] }));
  // One poll set for the whole life of the worker, edited in place: the eventfds have fixed
  // slots; a back end's fd (a TAP) gets a slot the first time its device asks for it, and
  // each round its events are what the device wants now (0: the kernel skips it). Nothing
  // is allocated per wake-up.
  const capacity = 1 + devices.reduce((n, d) => n + d.kickFds.length + 1 + MAX_BACKEND_FDS, 0);
  const set = new PollSet(capacity);
  const kind = new Uint8Array(capacity);
  const owner: (IoSideDevice | undefined)[] = new Array(capacity).fill(undefined);
  const queue = new Int32Array(capacity);
  const slot = (fd: number, k: number, d?: IoSideDevice, q = 0) => {
    const s = set.add(fd, k === SlotKind.BACKEND ? 0 : sys.POLLIN);
    kind[s] = k;
    owner[s] = d;
    queue[s] = q;
    return s;
  };
  slot(init.controlFd, SlotKind.CONTROL);
  for (const d of devices) {
    d.kickFds.forEach((fd, q) => slot(fd, SlotKind.KICK, d, q));
    slot(d.resampleFd, SlotKind.RESAMPLE, d);
  }
  const backendSlots = new Map<number, number>();
  /** The back-end slots, as a list to walk without an iterator, and the round each was last asked for. */
  const backendList = new Int32Array(capacity);
  let backendCount = 0;
  const wantedIn = new Int32Array(capacity);
  let round = 0;

  if (init.restoredQueues !== undefined) {
    for (const d of devices) {
      // A restored device whose driver had it running goes on at once; an INTx line that
      // was pending may not have reached the restored irqchip (irqfd injection is
      // asynchronous in the kernel): assert it again, as an EOI would.
      d.runner.sync();
      d.runner.resampled();
    }
  }

  /** Serve the kicks and EOIs already signalled, quiesce every device, report, sleep until resumed. */
  const park = (): void => {
    for (let k = 0; k < backendCount; k++) set.setEvents(backendList[k]!, 0);
    set.wait(0);
    for (let s = 0; s < set.size; s++) {
      if (set.revents(s) === 0) continue;
      const d = owner[s];
      if (kind[s] === SlotKind.KICK) {
        sys.drainEventfd(set.fd(s));
        d!.runner.kicked(queue[s]!);
      } else if (kind[s] === SlotKind.RESAMPLE) {
        sys.drainEventfd(set.fd(s));
        d!.runner.resampled();
      }
    }
    post({ type: "parked", queues: devices.map((d) => d.runner.quiesce()) });
    while (Atomics.load(init.control, IoControlCell.PAUSE) !== 0 && Atomics.load(init.control, IoControlCell.STOP) === 0) {
      Atomics.wait(init.control, IoControlCell.PAUSE, 1);
    }
    if (Atomics.load(init.control, IoControlCell.STOP) === 0) for (const d of devices) d.runner.resumed();
  };

  for (;;) {
    round++;
    for (let i = 0; i < devices.length; i++) {
      const d = devices[i]!;
      const want = d.runner.pollFds();
      for (let k = 0; k < want.length; k++) {
        const p = want[k]!;
        let s = backendSlots.get(p.fd);
        if (s === undefined) {
          s = slot(p.fd, SlotKind.BACKEND, d);
          backendSlots.set(p.fd, s);
          backendList[backendCount++] = s;
        }
        set.setEvents(s, p.events);
        wantedIn[s] = round;
      }
    }
    // Back-end slots no device asked for this round: skipped.
    for (let k = 0; k < backendCount; k++) {
      const s = backendList[k]!;
      if (wantedIn[s] !== round) set.setEvents(s, 0);
    }
    set.wait(-1);
    for (let s = 0; s < set.size; s++) {
      const revents = set.revents(s);
      if (revents === 0) continue;
      const d = owner[s];
      switch (kind[s]) {
        case SlotKind.BACKEND:
          d!.runner.pollReady(set.fd(s), revents);
          break;
        case SlotKind.KICK:
          sys.drainEventfd(set.fd(s));
          d!.runner.kicked(queue[s]!);
          break;
        case SlotKind.RESAMPLE:
          sys.drainEventfd(set.fd(s));
          d!.runner.resampled();
          break;
        default:
          sys.drainEventfd(set.fd(s));
          if (Atomics.load(init.control, IoControlCell.PAUSE) !== 0) park();
          if (Atomics.load(init.control, IoControlCell.STOP) !== 0) {
            // The back ends flush; the worker's exit tells the main thread they are done.
            for (const dev of devices) dev.runner.stop();
            for (const dev of devices) dev.close();
            return;
          }
          for (const dev of devices) dev.runner.sync();
      }
    }
  }
}

/**
 * Host fds one device may ask to have polled: a TAP or passt's socket; for virtio-fs, the
 * vhost-user socket and a call eventfd per queue relayed to INTx (or, once virtiofsd is
 * gone, the kick eventfds it no longer reads). virtio-fs has two queues: at most 3.
 */
const MAX_BACKEND_FDS = 8;

try {
  main(workerData as IoWorkerInit);
} catch (e) {
  post({ type: "failed", message: (e as Error).stack ?? String(e) });
}
