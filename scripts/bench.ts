/**
 * `npm run bench`: tskvm's speed, each figure beside a baseline measured in the same run.
 *
 *   pio-exit      PIO-exit round trips/s of a tiny guest under tskvm vs. a C KVM loop
 *                 (native/pio_exit_bench.c) running the same guest bytes. Target ratio >= 0.9.
 *   vcpu-start    process start -> all N vCPU threads about to enter KVM_RUN, N = 1, 2, 8.
 *   virtio-blk    device-model throughput (4 KiB random reads, 1 MiB sequential writes)
 *                 through the virtqueue in-process vs. plain pread/pwrite. Target >= 0.8.
 *   virtio-net    device-model packet rate TAP -> guest RX ring and TX ring -> TAP (64 B and
 *                 1500 B frames) vs. raw TAP read/write, in a namespace it makes and removes.
 *   boot          wall time to each Linux boot milestone with the default guest (skipped,
 *                 with the reason, when it is not built; --no-boot skips it).
 *
 * Results go to stdout as a table and to dist/bench.json.
 */
import { spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { buildNative, repoRoot } from "./lib/native";
import { Machine } from "../src/vmm/machine";
import { pioLoop } from "../test/helpers/guest-code";
import { bootFilesFor, findDefaultGuest } from "../src/guest/default-guest";
import { detectHostKvm } from "../src/kvm/host";
import { RunningCli } from "../test/helpers/cli";
import { benchBlock, formatBlockBench } from "./bench-blk";
import { benchNet, formatNetBench } from "./bench-net";
import { netTestSkipReason } from "../test/helpers/netns";

/** A port nothing claims, in KVM or tskvm: the C baseline uses the same. */
const BENCH_PORT = 0x5e0;
const ROUNDS = 3;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

function cBaseline(): number {
  const bin = buildNative("pio_exit_bench");
  const rates: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const r = spawnSync(bin, ["-n", "100000"], { encoding: "utf8" });
    if (r.status !== 0) throw new Error(`pio_exit_bench failed: ${r.stderr}`);
    rates.push((JSON.parse(r.stdout.trim().split("\n").pop()!) as { exitsPerSecond: number }).exitsPerSecond);
  }
  return median(rates);
}

/** Exits/s of tskvm's vCPU loop: two runs of different length; the difference cancels start-up. */
async function tskvmPioRate(): Promise<number> {
  const exitsAfter = async (ms: number): Promise<number> => {
    const m = Machine.create({
      memoryBytes: 16 * 1024 * 1024,
      cpus: 1,
      consoleFd: 2,
      irqchip: false,
      boot: { kind: "raw", code: pioLoop(BENCH_PORT), address: 0x1000, mode: "real" },
    });
    try {
      const running = m.run();
      await m.allStarted();
      await new Promise((r) => setTimeout(r, ms));
      m.stop("benchmark");
      return (await running).counters.io;
    } finally {
      m.destroy();
    }
  };
  const rates: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const short = await exitsAfter(500);
    const long = await exitsAfter(2500);
    rates.push((long - short) / 2.0);
  }
  return median(rates);
}

/** Milliseconds from a fresh process's start until all N vCPUs are running. */
function vcpuStart(n: number): number {
  const script = join(repoRoot(), "dist", "scripts", "vcpu-start.js");
  const times: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const r = spawnSync(process.execPath, [script, String(n)], { encoding: "utf8" });
    if (r.status !== 0) throw new Error(`vcpu-start ${n} failed: ${r.stderr}`);
    times.push(Number(r.stdout.trim()));
  }
  return median(times);
}

async function bootMilestones(): Promise<Record<string, number> | string> {
  const guest = findDefaultGuest();
  if (guest === undefined) return "skipped: no default guest built (npm run guest)";
  const emulated = detectHostKvm().kind === "emulated-pvm";
  const { kernel, initrd } = bootFilesFor(guest, emulated);
  const timeout = emulated ? 420_000 : 60_000;
  const vm = new RunningCli(["boot", "-k", kernel, "-i", initrd, "-m", "128M"]);
  const out: Record<string, number> = {};
  try {
    out["Linux version"] = await vm.waitFor(/Linux version \d/, timeout);
    out["Run /init"] = await vm.waitFor(/Run \/init as init process/, timeout);
    if (!emulated) out["ready marker"] = await vm.waitFor(/TSKVM-GUEST-READY/, timeout);
  } finally {
    vm.kill();
  }
  return out;
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const host = detectHostKvm();
  console.log(`tskvm benchmarks on ${host.summary.split(":")[0]}`);
  const results: Record<string, unknown> = { host: host.kind, date: new Date().toISOString() };

  const c = cBaseline();
  const ts = await tskvmPioRate();
  results["pio-exit"] = { cExitsPerSecond: Math.round(c), tskvmExitsPerSecond: Math.round(ts), ratio: ts / c };
  console.log(
    `pio-exit     C ${Math.round(c)} exits/s (${(1e6 / c).toFixed(2)} us), tskvm ${Math.round(ts)} exits/s (${(1e6 / ts).toFixed(2)} us): ratio ${(ts / c).toFixed(3)} (target >= 0.9)`,
  );

  const starts: Record<string, number> = {};
  for (const n of [1, 2, 8]) {
    starts[n] = vcpuStart(n);
    console.log(`vcpu-start   ${n} vCPU${n > 1 ? "s" : " "}: ${starts[n]!.toFixed(1)} ms from process start to all running`);
  }
  results["vcpu-start-ms"] = starts;

  const blk = await benchBlock();
  results["virtio-blk"] = blk;
  for (const line of formatBlockBench(blk).split("\n")) console.log(`virtio-blk   ${line}`);

  const netSkip = netTestSkipReason();
  if (netSkip !== undefined) {
    results["virtio-net"] = `skipped: ${netSkip}`;
    console.log(`virtio-net   skipped: ${netSkip}`);
  } else {
    const net = await benchNet();
    results["virtio-net"] = net;
    for (const line of formatNetBench(net).split("\n")) console.log(`virtio-net   ${line}`);
  }

  if (args.includes("--no-boot")) {
    results.boot = "skipped: --no-boot";
  } else {
    const boot = await bootMilestones();
    results.boot = boot;
    if (typeof boot === "string") console.log(`boot         ${boot}`);
    else for (const [k, v] of Object.entries(boot)) console.log(`boot         ${k}: ${(v / 1000).toFixed(1)} s`);
  }
  const file = join(repoRoot(), "dist", "bench.json");
  writeFileSync(file, `${JSON.stringify(results, null, 2)}\n`);
  console.log(`results in ${file}`);
}

main().then(
  () => process.exit(0),
  (e: Error) => {
    console.error(`bench: ${e.message}`);
    process.exit(1);
  },
);
