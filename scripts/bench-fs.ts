/**
 * virtio-fs beside virtio-blk, inside one guest, the same files on both: a 256 MiB file
 * read whole, and a tree of 10,000 small files walked (find -type f: a lookup and an
 * attribute read per file). The blk side is an ext4 image of the same directory (tskvm
 * mkdisk), mounted read-only; the fs side is the directory shared read-only. The guest's
 * page cache is dropped before every measurement; the host's is warm for both (the image
 * and the files were just written). Each figure is the median of `rounds`, the two sides
 * measured alternately; the ratio is virtio-fs time / virtio-blk time (above 1: virtio-fs
 * is slower).
 *
 * Run alone: node dist/scripts/bench-fs.js [--rounds N] [--mib N] [--files N]
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync, openSync, writeSync, closeSync } from "node:fs";
import { randomFillSync } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startVm } from "../src/api/vm";
import { findMkfsExt4, makeDiskImage } from "../src/api/disk";
import { findDefaultGuest } from "../src/api/default-guest";
import { findVirtiofsd } from "../src/host/virtiofsd";
import { runStandalone } from "./lib/standalone";

export interface FsBenchOptions {
  rounds?: number;
  /** Size of the big file, MiB (default 256). */
  mib?: number;
  /** Small files in the tree (default 10,000; 100 per directory). */
  files?: number;
}

export interface FsBenchSide {
  readMs: number;
  walkMs: number;
}

export interface FsBenchResult {
  mib: number;
  files: number;
  rounds: number;
  virtioFs: FsBenchSide;
  virtioBlk: FsBenchSide;
  /** virtio-fs time / virtio-blk time. */
  readRatio: number;
  walkRatio: number;
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/** Why the benchmark cannot run here, or undefined. */
export function fsBenchSkipReason(): string | undefined {
  if (findDefaultGuest() === undefined) return "no default guest built (npm run guest)";
  if (findVirtiofsd() === undefined) return "virtiofsd is not installed (apt-get install qemu-system-common)";
  if (findMkfsExt4() === undefined) return "mkfs.ext4 is not installed (apt-get install e2fsprogs)";
  return undefined;
}

export async function benchFs(opts: FsBenchOptions = {}): Promise<FsBenchResult> {
  const rounds = opts.rounds ?? 3;
  const mib = opts.mib ?? 256;
  const files = opts.files ?? 10_000;
  const skip = fsBenchSkipReason();
  if (skip !== undefined) throw new Error(skip);
  const work = mkdtempSync(join(tmpdir(), "tskvm-bench-fs-"));
  try {
    const data = join(work, "data");
    makeTree(data, mib, files);
    const image = join(work, "data.img");
    await makeDiskImage(data, image);
    const vm = await startVm({ memory: "1G", disks: [`${image},readonly`], shares: [{ path: data, readOnly: true, tag: "data" }] });
    try {
      await vm.ready({ timeoutMs: 600_000 });
      const setup = await vm.run("mkdir -p /mnt/blk && mount -o ro /dev/vda /mnt/blk");
      if (setup.status !== 0) throw new Error(`mounting the disk failed: ${setup.stderr.trim()}`);
      const timed = async (command: string, expect: RegExp): Promise<number> => {
        const r = await vm.run(`sync; echo 3 > /proc/sys/vm/drop_caches; ${command}`, { timeoutMs: 1_800_000 });
        if (r.status !== 0 || !expect.test(r.stdout)) throw new Error(`'${command}' failed (${r.status}): ${r.stdout.trim()} ${r.stderr.trim()}`);
        return r.durationMs;
      };
      const samples = { fs: { read: [] as number[], walk: [] as number[] }, blk: { read: [] as number[], walk: [] as number[] } };
      const roots = { fs: data, blk: "/mnt/blk" };
      for (let i = 0; i < rounds; i++) {
        for (const side of ["fs", "blk"] as const) {
          samples[side].read.push(await timed(`cat ${roots[side]}/big.bin > /dev/null && echo ok`, /^ok$/m));
          samples[side].walk.push(await timed(`find ${roots[side]}/tree -type f | wc -l`, new RegExp(`^\\s*${files}\\s*$`, "m")));
        }
      }
      const side = (s: { read: number[]; walk: number[] }): FsBenchSide => ({ readMs: median(s.read), walkMs: median(s.walk) });
      const virtioFs = side(samples.fs);
      const virtioBlk = side(samples.blk);
      return { mib, files, rounds, virtioFs, virtioBlk, readRatio: virtioFs.readMs / virtioBlk.readMs, walkRatio: virtioFs.walkMs / virtioBlk.walkMs };
    } finally {
      await vm.poweroff();
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

/** big.bin (incompressible, no holes) and tree/dNN/fNNNN, 100 files per directory. */
function makeTree(root: string, mib: number, files: number): void {
  mkdirSync(join(root, "tree"), { recursive: true });
  const chunk = randomFillSync(Buffer.alloc(1024 * 1024));
  const fd = openSync(join(root, "big.bin"), "w");
  try {
    for (let i = 0; i < mib; i++) {
      chunk.writeUInt32LE(i, 0); // no two MiB alike
      writeSync(fd, chunk);
    }
  } finally {
    closeSync(fd);
  }
  for (let i = 0; i < files; i++) {
    const d = join(root, "tree", `d${String(Math.floor(i / 100)).padStart(3, "0")}`);
    if (i % 100 === 0) mkdirSync(d);
    writeFileSync(join(d, `f${String(i).padStart(5, "0")}`), `small file ${i}\n`);
  }
}

export function formatFsBench(r: FsBenchResult): string {
  const s = (ms: number) => `${(ms / 1000).toFixed(2)} s`;
  return [
    `inside the guest, ${r.mib} MiB file read and ${r.files}-file tree walked (median of ${r.rounds}, guest cache dropped)`,
    `  read ${r.mib} MiB   virtio-fs ${s(r.virtioFs.readMs)}, virtio-blk ext4 ${s(r.virtioBlk.readMs)}: ratio ${r.readRatio.toFixed(2)}`,
    `  walk ${r.files} files   virtio-fs ${s(r.virtioFs.walkMs)}, virtio-blk ext4 ${s(r.virtioBlk.walkMs)}: ratio ${r.walkRatio.toFixed(2)}`,
  ].join("\n");
}

if (require.main === module) {
  runStandalone<FsBenchOptions, FsBenchResult>("bench-fs", { "--rounds": "rounds", "--mib": "mib", "--files": "files" }, benchFs, formatFsBench);
}
