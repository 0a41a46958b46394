/**
 * For the start-up benchmark helpers: run a built machine until every vCPU thread is about
 * to enter KVM_RUN, print the milliseconds since this process started, end it.
 */
import { performance } from "node:perf_hooks";
import type { Machine } from "../../src/vmm/machine";

export async function printStartTime(m: Machine): Promise<void> {
  const running = m.run();
  await m.allStarted();
  const ms = performance.now();
  m.stop("benchmark");
  await running;
  m.destroy();
  process.stdout.write(`${ms.toFixed(1)}\n`);
}
