/**
 * Benchmark helper: start a machine with N vCPUs spinning in real mode and print the
 * milliseconds from this process's start until every vCPU thread is about to run.
 */
import { Machine } from "../src/vmm/machine";
import { SPIN } from "../test/helpers/guest-code";
import { printStartTime } from "./lib/start-time";

const n = Number(process.argv[2] ?? "1");
void printStartTime(
  Machine.create({
    memoryBytes: 16 * 1024 * 1024,
    cpus: n,
    consoleFd: 2,
    boot: { kind: "raw", code: SPIN, address: 0x1000, mode: "real" },
  }),
);
