/**
 * Entry point of the I/O worker thread (see io-thread.ts).
 */
import { parentPort, workerData } from "node:worker_threads";
import * as sys from "../sys/libc";
import { GuestMemory } from "../memory/guest-memory";
import { IoControlCell, IoWorkerInit, IoWorkerMessage } from "./io-thread";
import { instantiateIoDevice, IoDeviceInstance } from "../vmm/io-devices";

function post(m: IoWorkerMessage): void {
  parentPort!.postMessage(m);
}

/** What each polled fd means. */
type Source =
  | { kind: "control" }
  | { kind: "kick"; device: IoDeviceInstance; queue: number }
  | { kind: "resample"; device: IoDeviceInstance };

function main(init: IoWorkerInit): void {
  const memory = GuestMemory.attach(init.memory);
  const log = { warn: (message: string) => post({ type: "warning", message }) };
  const devices = init.devices.map((spec) => instantiateIoDevice(spec, { memory, vmFd: init.vmFd, log }));
  const fds: sys.PollFd[] = [];
  const sources: Source[] = [];
  const watch = (fd: number, source: Source) => {
    fds.push({ fd, events: sys.POLLIN, revents: 0 });
    sources.push(source);
  };
  watch(init.controlFd, { kind: "control" });
  for (const d of devices) {
    d.kickFds.forEach((fd, queue) => watch(fd, { kind: "kick", device: d, queue }));
    if (d.resampleFd !== undefined) watch(d.resampleFd, { kind: "resample", device: d });
  }
  const counter = new Uint8Array(8);
  const drain = (fd: number) => sys.read(fd, counter);

  for (;;) {
    sys.poll(fds, -1);
    for (let i = 0; i < fds.length; i++) {
      const p = fds[i]!;
      if ((p.revents & (sys.POLLIN | sys.POLLERR | sys.POLLHUP)) === 0) continue;
      drain(p.fd);
      const s = sources[i]!;
      if (s.kind === "kick") s.device.io.kicked(s.queue);
      else if (s.kind === "resample") s.device.io.resampled();
      else {
        if (Atomics.load(init.control, IoControlCell.STOP) !== 0) {
          for (const d of devices) d.io.stop();
          for (const d of devices) d.close();
          post({ type: "stopped" });
          return;
        }
        for (const d of devices) d.io.sync();
      }
    }
  }
}

try {
  main(workerData as IoWorkerInit);
} catch (e) {
  post({ type: "failed", message: (e as Error).stack ?? String(e) });
}
