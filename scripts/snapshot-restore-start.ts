/**
 * Benchmark helper: restore the snapshot in argv[2] (made by bench-snapshot.ts with a tiny
 * guest) in this fresh process and print the milliseconds from this process's start until
 * every vCPU thread is about to run again.
 */
import { performance } from "node:perf_hooks";
import { Machine } from "../src/vmm/machine";
import { readSnapshotDir } from "../src/vmm/snapshot/format";

async function main(): Promise<void> {
  const m = Machine.restore({ snapshot: readSnapshotDir(process.argv[2]!, { tskvmVersion: process.argv[3] ?? "bench" }), consoleFd: 2 });
  const running = m.run();
  await m.allStarted();
  const ms = performance.now();
  m.stop("benchmark");
  await running;
  m.destroy();
  process.stdout.write(`${ms.toFixed(1)}\n`);
}

void main();
