/**
 * Benchmark helper: start a machine with N vCPUs spinning in real mode and print the
 * milliseconds from this process's start until the boot vCPU entered KVM_RUN (its own
 * thread's clock: Machine.startupTimeline). Like bin/tskvm it loads tskvm from the one-file
 * bundle when there is one (npm run build makes it), so the figure is tskvm's start-up.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import type { Machine as MachineClass } from "../src/vmm/machine";
import { SPIN } from "../test/helpers/guest-code";

function loadMachine(): typeof MachineClass {
  const loaderFile = join(__dirname, "..", "tskvm-loader.js");
  if (!existsSync(loaderFile)) return (require("../src/vmm/machine") as typeof import("../src/vmm/machine")).Machine;
  const loader = require(loaderFile) as { load(key: string): unknown };
  (loader.load("src/sys/threads.js") as typeof import("../src/sys/threads")).useBundle(loaderFile);
  return (loader.load("src/vmm/machine.js") as typeof import("../src/vmm/machine")).Machine;
}

async function main(): Promise<void> {
  const Machine = loadMachine();
  const n = Number(process.argv[2] ?? "1");
  const m = Machine.create({
    memoryBytes: 16 * 1024 * 1024,
    cpus: n,
    consoleFd: 2,
    boot: { kind: "raw", code: SPIN, address: 0x1000, mode: "real" },
  });
  const running = m.run();
  await m.allStarted();
  const ms = m.startupTimeline().firstKvmRun;
  m.stop("benchmark");
  await running;
  m.destroy();
  process.stdout.write(`${ms.toFixed(1)}\n`);
}

void main();
