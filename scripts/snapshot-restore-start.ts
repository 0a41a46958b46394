/**
 * Benchmark helper: restore the snapshot in argv[2] (made by bench-snapshot.ts with a tiny
 * guest, tskvm version argv[3]) in this fresh process and print the milliseconds from this
 * process's start until every vCPU thread is about to run again.
 */
import { Machine } from "../src/vmm/machine";
import { readSnapshotDir } from "../src/vmm/snapshot/format";
import { printStartTime } from "./lib/start-time";

void printStartTime(Machine.restore({ snapshot: readSnapshotDir(process.argv[2]!, { tskvmVersion: process.argv[3] ?? "bench" }), consoleFd: 2 }));
