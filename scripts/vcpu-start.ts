/**
 * Benchmark helper: start a machine with N vCPUs spinning in real mode and print the
 * milliseconds from this process's start until the boot vCPU entered KVM_RUN (its own
 * thread's clock: Machine.startupTimeline).
 */
import { Machine } from "../src/vmm/machine";
import { SPIN } from "../test/helpers/guest-code";

async function main(): Promise<void> {
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
