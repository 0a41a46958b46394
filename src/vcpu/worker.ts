/**
 * Entry point of a vCPU worker thread. It builds its own views of guest RAM and of the
 * shared device state, reports its pthread id (so the main thread can kick it out of
 * KVM_RUN with a signal), runs the exit loop synchronously and reports why it stopped.
 */
import { parentPort, workerData } from "node:worker_threads";
import { performance } from "node:perf_hooks";
import { pthreadSelf } from "../sys/libc";
import { Vcpu } from "../kvm/vcpu";
import { GuestMemory } from "../memory/guest-memory";
import { ExitLoop, RunControlCell, VcpuStop } from "./exit-loop";
import { instantiateDevices } from "../board/devices";
import type { VcpuWorkerInit, VcpuWorkerMessage } from "./vcpu-thread";

/** When this thread had loaded its code (wall clock, ms since the epoch), for the start-up timeline. */
const loadedAt = performance.timeOrigin + performance.now();

function post(msg: VcpuWorkerMessage): void {
  parentPort!.postMessage(msg);
}

function main(init: VcpuWorkerInit): void {
  const vcpu = Vcpu.attach(init.vcpu);
  const memory = GuestMemory.attach(init.memory);
  let loop: ExitLoop | undefined;
  const devices = instantiateDevices(init.devices, {
    vmFd: init.vmFd,
    consoleFd: init.consoleFd,
    memory,
    ...(init.ioControlFd !== undefined ? { ioControlFd: init.ioControlFd } : {}),
    warn: (message) => post({ type: "warning", message }),
    stopping: () => Atomics.load(init.control, RunControlCell.STOP) !== 0,
    control: {
      requestReset: (reason) => loop?.requestReset(reason),
      guestPanicked: (reason, now) => loop?.guestPanicked(reason, now),
    },
  });
  loop = new ExitLoop(vcpu, devices.pio, devices.mmio, init.control, init.haltStatus, init.coalescing ? { coalesced: vcpu.coalescedRing() } : {});
  loop.onRegisterDump = (dump) => post({ type: "registers", id: vcpu.id, dump });
  // The wall-clock time (ms since the epoch, high resolution) of the first KVM_RUN, for
  // the start-up timeline: the main thread's own clock has another time origin.
  post({ type: "started", id: vcpu.id, thread: pthreadSelf(), at: performance.timeOrigin + performance.now(), loadedAt });
  let stop: VcpuStop;
  try {
    stop = loop.run();
  } catch (e) {
    stop = { kind: "error", reason: `vCPU ${vcpu.id}: ${(e as Error).stack ?? String(e)}` };
  }
  post({ type: "stopped", id: vcpu.id, stop, counters: loop.counters, exits: loop.stats.data() });
}

// Started with its init (workerData), or ahead of its vCPU: then the init comes as the
// first message, once the machine is built (vcpu-thread.ts, prestartVcpuWorker).
if (workerData !== undefined && workerData !== null) main(workerData as VcpuWorkerInit);
else parentPort!.once("message", (m: { type: "init"; init: VcpuWorkerInit }) => main(m.init));
