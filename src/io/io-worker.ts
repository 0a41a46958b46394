/**
 * Entry point of the I/O worker thread (see io-thread.ts).
 */
import { parentPort, workerData } from "node:worker_threads";
import * as sys from "../sys/libc";
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

/** What each polled fd means. */
type Source =
  | { kind: "control" }
  | { kind: "kick"; device: IoSideDevice; queue: number }
  | { kind: "resample"; device: IoSideDevice }
  | { kind: "backend"; device: IoSideDevice };

function main(init: IoWorkerInit): void {
  const memory = GuestMemory.attach(init.memory);
  const log = { warn: (message: string) => post({ type: "warning", message }) };
  // This thread owns the VM's GSI routing table: every change re-sends all of it.
  const msiRoutes = new MsiRoutes(new Vm(init.vmFd));
  const devices = init.devices.map((spec, i) => instantiateIoSide(spec, { memory, vmFd: init.vmFd, log, msiRoutes, restored: init.restoredQueues?.[i] }));
  // Eventfds are polled always; back-end fds (a TAP) as their device asks, so they are
  // appended afresh before every poll.
  const fixed: sys.PollFd[] = [];
  const fixedSources: Source[] = [];
  const watch = (fd: number, source: Source) => {
    fixed.push({ fd, events: sys.POLLIN, revents: 0 });
    fixedSources.push(source);
  };
  watch(init.controlFd, { kind: "control" });
  for (const d of devices) {
    d.kickFds.forEach((fd, queue) => watch(fd, { kind: "kick", device: d, queue }));
    watch(d.resampleFd, { kind: "resample", device: d });
  }
  if (init.restoredQueues !== undefined) {
    for (const d of devices) {
      // A restored device whose driver had it running goes on at once; an INTx line that
      // was pending may not have reached the restored irqchip (irqfd injection is
      // asynchronous in the kernel): assert it again, as an EOI would.
      d.runner.sync();
      d.runner.resampled();
    }
  }

  /** Serve what is already signalled, quiesce every device, report, sleep until resumed. */
  const park = (): void => {
    const ready = fixed.map((p) => ({ fd: p.fd, events: p.events, revents: 0 }));
    sys.poll(ready, 0);
    ready.forEach((p, i) => {
      const s = fixedSources[i]!;
      if (p.revents === 0 || s.kind === "control") return;
      sys.drainEventfd(p.fd);
      if (s.kind === "kick") s.device.runner.kicked(s.queue);
      else if (s.kind === "resample") s.device.runner.resampled();
    });
    post({ type: "parked", queues: devices.map((d) => d.runner.quiesce()) });
    while (Atomics.load(init.control, IoControlCell.PAUSE) !== 0 && Atomics.load(init.control, IoControlCell.STOP) === 0) {
      Atomics.wait(init.control, IoControlCell.PAUSE, 1);
    }
    if (Atomics.load(init.control, IoControlCell.STOP) === 0) for (const d of devices) d.runner.resumed();
  };

  for (;;) {
    const fds = fixed.slice();
    const sources = fixedSources.slice();
    for (const d of devices) {
      for (const p of d.runner.pollFds()) {
        if (p.events === 0) continue;
        fds.push({ fd: p.fd, events: p.events, revents: 0 });
        sources.push({ kind: "backend", device: d });
      }
    }
    sys.poll(fds, -1);
    for (let i = 0; i < fds.length; i++) {
      const p = fds[i]!;
      if (p.revents === 0) continue;
      const s = sources[i]!;
      if (s.kind === "backend") {
        s.device.runner.pollReady(p.fd, p.revents);
        continue;
      }
      sys.drainEventfd(p.fd);
      if (s.kind === "kick") s.device.runner.kicked(s.queue);
      else if (s.kind === "resample") s.device.runner.resampled();
      else {
        if (Atomics.load(init.control, IoControlCell.PAUSE) !== 0) park();
        if (Atomics.load(init.control, IoControlCell.STOP) !== 0) {
          // The back ends flush; the worker's exit tells the main thread they are done.
          for (const d of devices) d.runner.stop();
          return;
        }
        for (const d of devices) d.runner.sync();
      }
    }
  }
}

try {
  main(workerData as IoWorkerInit);
} catch (e) {
  post({ type: "failed", message: (e as Error).stack ?? String(e) });
}
