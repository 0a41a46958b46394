/**
 * `npm run bench` section "snapshot":
 *
 *   restore-start  a fresh process restoring a snapshot of a tiny guest until its vCPUs run,
 *                  with 256 MiB and with 8 GiB of RAM (RAM is mapped copy-on-write: the two
 *                  should cost the same), beside the same process booting it (vcpu-start).
 *                  Target on hardware-semantics KVM: < 300 ms for 256 MiB.
 *   run            `tskvm run --snapshot DIR -- true`: the cold run (boot, snapshot, command)
 *                  and the warm run (restore, command), with the default guest. Target: warm
 *                  <= 0.1 x cold. And the snapshot's stored RAM against the RAM the guest
 *                  touched (target: stored <= touched).
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { repoRoot } from "./lib/native";
import { Machine } from "../src/vmm/machine";
import { counterLoop } from "../test/helpers/guest-code";
import { findDefaultGuest } from "../src/api/default-guest";

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

/** A snapshot of a tiny guest with `memoryBytes` of RAM, 48 MiB of it data (like a small booted Linux). */
async function tinySnapshot(dir: string, memoryBytes: number): Promise<void> {
  const m = Machine.create({ memoryBytes, cpus: 1, consoleFd: 2, boot: { kind: "raw", code: counterLoop(), address: 0x100000, mode: "long" } });
  try {
    m.memory.fill(16 * MiB, 48 * MiB, 0x5a);
    const running = m.run();
    await m.allStarted();
    await m.pause();
    m.snapshot(dir, { tskvmVersion: "bench" });
    m.stop("benchmark");
    await running;
  } finally {
    m.destroy();
  }
}

export interface RestoreStartResult {
  /** ms from process start to vCPUs running, by RAM size ("256M", "8G"). */
  restoreMs: Record<string, number>;
}

export async function benchRestoreStart(rounds: number): Promise<RestoreStartResult> {
  const work = mkdtempSync(join(tmpdir(), "tskvm-bench-snapshot-"));
  const script = join(repoRoot(), "dist", "scripts", "snapshot-restore-start.js");
  try {
    const restoreMs: Record<string, number> = {};
    for (const [name, bytes] of [["256M", 256 * MiB], ["8G", 8 * GiB]] as const) {
      const dir = join(work, name);
      await tinySnapshot(dir, bytes);
      const times: number[] = [];
      for (let i = 0; i < rounds; i++) {
        const r = spawnSync(process.execPath, [script, dir, "bench"], { encoding: "utf8" });
        if (r.status !== 0) throw new Error(`snapshot-restore-start failed: ${r.stderr}`);
        times.push(Number(r.stdout.trim()));
      }
      restoreMs[name] = median(times);
    }
    return { restoreMs };
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

export interface SnapshotRunResult {
  coldMs: number;
  warmMs: number;
  ratio: number;
  rounds: number;
  ramBytes: number;
  ramDataBytes: number;
  ramTouchedBytes: number;
}

/** Cold and warm `tskvm run --snapshot DIR -- true` with the default guest; a reason string when skipped. */
export function benchSnapshotRun(rounds: number): SnapshotRunResult | string {
  if (findDefaultGuest() === undefined) return "skipped: no default guest built (npm run guest)";
  const cache = mkdtempSync(join(tmpdir(), "tskvm-bench-snapcache-"));
  const tskvm = join(repoRoot(), "bin", "tskvm");
  const timed = (): number => {
    const t0 = process.hrtime.bigint();
    const r = spawnSync(process.execPath, [tskvm, "run", "--snapshot", cache, "--", "true"], { encoding: "utf8", timeout: 900_000 });
    if (r.status !== 0) throw new Error(`tskvm run --snapshot failed (${r.status}): ${r.stderr.trim()}`);
    return Number(process.hrtime.bigint() - t0) / 1e6;
  };
  try {
    const coldMs = timed();
    const warm: number[] = [];
    for (let i = 0; i < rounds; i++) warm.push(timed());
    const entry = readdirSync(cache).find((e) => !e.startsWith("."));
    if (entry === undefined) throw new Error("the cold run left no snapshot");
    const ram = (JSON.parse(readFileSync(join(cache, entry, "snapshot.json"), "utf8")) as { body: { ram: { bytes: number; dataBytes: number; touchedBytes: number } } }).body.ram;
    const warmMs = median(warm);
    return { coldMs, warmMs, ratio: warmMs / coldMs, rounds, ramBytes: ram.bytes, ramDataBytes: ram.dataBytes, ramTouchedBytes: ram.touchedBytes };
  } finally {
    rmSync(cache, { recursive: true, force: true });
  }
}

const mib = (n: number): string => `${(n / MiB).toFixed(1)} MiB`;

export function formatSnapshotBench(start: RestoreStartResult, bootMs: number, run: SnapshotRunResult | string): string {
  const lines = [
    `restore-start 256 MiB ${start.restoreMs["256M"]!.toFixed(1)} ms, 8 GiB ${start.restoreMs["8G"]!.toFixed(1)} ms from process start to vCPUs running (boot of the same tiny guest: ${bootMs.toFixed(1)} ms; target < 300 ms on hardware KVM)`,
  ];
  if (typeof run === "string") lines.push(`run --snapshot ${run}`);
  else {
    lines.push(
      `run --snapshot -- true: cold ${(run.coldMs / 1000).toFixed(2)} s, warm ${(run.warmMs / 1000).toFixed(2)} s (median of ${run.rounds}): ratio ${run.ratio.toFixed(3)} (target <= 0.1)`,
      `snapshot RAM stored ${mib(run.ramDataBytes)} of ${mib(run.ramBytes)}; the guest had touched ${mib(run.ramTouchedBytes)} (target: stored <= touched)`,
    );
  }
  return lines.join("\n");
}
