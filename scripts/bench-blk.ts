/**
 * virtio-blk against C, in process: requests go through the split virtqueue exactly as a
 * guest sends them (the test driver writes descriptors, available ring and headers into
 * real mmap'd guest memory), the device serves them through its engine on a temp image,
 * and each figure is set beside a C program (native/blk_baseline.c) doing the same system
 * calls on the same file with the same sizes and offsets, in rounds that alternate which
 * goes first. Every figure is a ratio to C with its spread over the rounds.
 *
 *   randRead4k    4 KiB reads at random 4 KiB-aligned offsets (page cache), 64 requests
 *                 per kick (queue depth 64): requests/s against C's pread per request
 *   pages256      1 MiB writes of 256 scattered 4 KiB pages (an indirect table, as Linux
 *                 sends them), sequential: requests/s against C's pwritev per request
 *
 * Both for the io_uring engine (one io_uring_enter per kick) and the sync engine (a system
 * call per request), when io_uring is usable here; C's own io_uring figure (64 reads per
 * enter) is printed for information. Only the device's queueNotified is timed: the
 * driver's part is the guest's work.
 *
 * `node dist/scripts/bench-blk.js [--rounds N] [--file-mib N]` runs it standalone.
 */
import * as fs from "node:fs";
import * as os from "node:os";
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { GuestMemory } from "../src/memory/guest-memory";
import { VirtioFeatureBit, feature } from "../src/devices/virtio/types";
import { VirtioBlock } from "../src/devices/virtio/blk/device";
import { VirtioBlkRequest, VirtioBlkStatus } from "../src/devices/virtio/blk/request";
import { openDiskImage } from "../src/host/disk-image";
import { FileBlockEngine } from "../src/host/block-file-engine";
import { BLOCK_RING_ENTRIES, UringBlockEngine } from "../src/host/block-uring-engine";
import { IoUring, probeIoUring } from "../src/sys/io-uring";
import type { BlockBackend } from "../src/devices/virtio/blk/backend";
import { VirtqDriver } from "../test/helpers/virtq-driver";
import { buildNative } from "./lib/native";
import { type PairedResult, type Spread, formatRatio, paired, spread, xorshift32 } from "./lib/rounds";
import { runStandalone } from "./lib/standalone";

export interface BlockFigure {
  /** tskvm requests/s over C's, per round. */
  ratio: Spread;
  /** ns per request: tskvm, C. */
  nsPerRequest: { tskvm: number; c: number };
}

export interface BlockBenchResult {
  engines: Record<string, { randRead4k: BlockFigure; pages256: BlockFigure }>;
  /** C with io_uring, 64 reads per io_uring_enter, ns per read (information). */
  cUringReadNs: Spread | string;
  fileMiB: number;
  rounds: number;
}

export interface BlockBenchOptions {
  rounds?: number;
  /** Size of the temp image (64-256 MiB). */
  fileMiB?: number;
  /** Where the temp image goes (default: the OS temp dir). */
  dir?: string;
}

const KiB = 1024;
const MiB = 1024 * KiB;
const READ_BATCH = 64;
const PAGES = 256;
const SEED = 0x2545f491;
/** Requests per round: C and tskvm each take roughly a tenth of a second to half a second. */
const READS_PER_ROUND = 64 * 1024;
const WRITES_PER_ROUND = 1024;

export async function benchBlock(options: BlockBenchOptions = {}): Promise<BlockBenchResult> {
  const rounds = options.rounds ?? 7;
  const fileMiB = Math.min(256, Math.max(64, options.fileMiB ?? 128));
  const dir = fs.mkdtempSync(join(options.dir ?? os.tmpdir(), "tskvm-bench-blk-"));
  const path = join(dir, "bench.img");
  const fileBytes = fileMiB * MiB;
  // A fully written (allocated, cached) image so reads hit data, not holes.
  {
    const fd = fs.openSync(path, "w");
    const chunk = Buffer.alloc(MiB);
    for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 131) & 0xff;
    for (let o = 0; o < fileBytes; o += MiB) fs.writeSync(fd, chunk, 0, MiB, o);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
  }
  const cBin = buildNative("blk_baseline");
  /** One C round: ns per request, as the program measured it. */
  const c = (mode: string, ops: number, extra: string[] = []): number => {
    const r = spawnSync(cBin, ["--file", path, "--mode", mode, "--ops", String(ops), "--warmup", String(Math.floor(ops / 8)), "--seed", String(SEED), ...extra], {
      encoding: "utf8",
    });
    if (r.status !== 0) throw new Error(`blk_baseline ${mode} failed: ${r.stderr.trim()}`);
    return (JSON.parse(r.stdout) as { nsPerOp: number }).nsPerOp;
  };
  const mem = GuestMemory.allocate(64 * MiB);
  const image = openDiskImage(path);
  const engines: { name: string; make: () => BlockBackend & { close?(): void } }[] = [];
  if (probeIoUring().available) {
    engines.push({ name: "io_uring", make: () => new UringBlockEngine(image, { ring: IoUring.create(BLOCK_RING_ENTRIES) }) });
  }
  engines.push({ name: "sync", make: () => new FileBlockEngine(image) });
  try {
    const out: BlockBenchResult["engines"] = {};
    for (const e of engines) {
      const engine = e.make();
      try {
        const dev = new VirtioBlock(engine);
        const drv = new VirtqDriver(mem, { size: 256 });
        let failures = 0;
        dev.activate({
          memory: mem,
          features: feature(VirtioFeatureBit.VERSION_1) | feature(VirtioFeatureBit.RING_EVENT_IDX) | feature(VirtioFeatureBit.RING_INDIRECT_DESC) | dev.deviceFeatures,
          queues: [drv.config()],
          signalUsed: () => {},
          needsReset: (r) => {
            throw new Error(`device broke: ${r}`);
          },
        });
        /** Chains built once (header, data, status) and published again with new sectors. */
        const build = (count: number, write: boolean, pages: number) =>
          Array.from({ length: count }, () => {
            const hdr = drv.alloc(16);
            const data = drv.alloc(pages === 0 ? 4 * KiB : 2 * pages * 4 * KiB, 4096);
            const status = drv.alloc(1);
            // Touched, as C's buffers are (memset): no first-touch page faults in the rounds.
            mem.fill(data, pages === 0 ? 4 * KiB : 2 * pages * 4 * KiB, 0x5a);
            mem.writeU32(hdr, write ? VirtioBlkRequest.OUT : VirtioBlkRequest.IN);
            const bufs =
              pages === 0
                ? [{ addr: data, len: 4 * KiB, write: !write }]
                : Array.from({ length: pages }, (_, i) => ({ addr: data + 2 * i * 4 * KiB, len: 4 * KiB, write: !write }));
            const head = drv.addChain([{ addr: hdr, len: 16 }, ...bufs, { addr: status, len: 1, write: true }], { indirect: pages > 0 });
            return { head, hdr, status };
          });
        const reads = build(READ_BATCH, false, 0);
        const writes = build(4, true, PAGES);
        const blocks = fileBytes / (4 * KiB);
        /** tskvm: ns per request over `total` requests in kicks of `chains`. */
        const device = (chains: typeof reads, total: number, offsetOf: (i: number) => number): number => {
          let busy = 0n;
          for (let k = 0; k < total; ) {
            for (const ch of chains) {
              const sector = offsetOf(k++) / 512;
              mem.writeU32(ch.hdr + 8, sector >>> 0);
              mem.writeU32(ch.hdr + 12, Math.floor(sector / 0x100000000));
              drv.publish(ch.head);
            }
            const t = process.hrtime.bigint();
            dev.queueNotified(0);
            busy += process.hrtime.bigint() - t;
            drv.skipUsed();
          }
          for (const ch of chains) if (mem.readU8(ch.status) !== VirtioBlkStatus.OK) failures++;
          return Number(busy) / total;
        };
        const readRound = () => {
          const next = xorshift32(SEED);
          return device(reads, READS_PER_ROUND, () => (next() % blocks) * 4 * KiB);
        };
        const writeRound = () => device(writes, WRITES_PER_ROUND, (i) => (i % (fileBytes / MiB)) * MiB);
        // Warm the JIT up, then rounds: rates are 1/ns, so the ratio is C's ns over tskvm's.
        readRound();
        writeRound();
        const rr = await paired(rounds, readRound, () => c("pread", READS_PER_ROUND), { lowerIsBetter: true });
        const pw = await paired(rounds, writeRound, () => c("pwritev", WRITES_PER_ROUND), { lowerIsBetter: true });
        if (failures > 0) throw new Error(`${failures} requests failed`);
        const figure = (p: PairedResult): BlockFigure => ({ ratio: p.ratio, nsPerRequest: { tskvm: p.subject.median, c: p.baseline.median } });
        out[e.name] = { randRead4k: figure(rr), pages256: figure(pw) };
      } finally {
        engine.close?.();
      }
    }
    let cUringReadNs: Spread | string = "skipped: io_uring unusable here";
    if (probeIoUring().available) {
      cUringReadNs = spread(Array.from({ length: rounds }, () => c("uring", READS_PER_ROUND, ["--batch", String(READ_BATCH)])));
    }
    return { engines: out, cUringReadNs, fileMiB, rounds };
  } finally {
    image.close();
    mem.free();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

export function formatBlockBench(r: BlockBenchResult): string {
  const lines: string[] = [];
  for (const [name, e] of Object.entries(r.engines)) {
    lines.push(
      `blk ${name.padEnd(8)} 4 KiB random reads, 64 per kick: ${e.randRead4k.nsPerRequest.tskvm.toFixed(0)} ns/request, C pread ${e.randRead4k.nsPerRequest.c.toFixed(0)} ns: ratio ${formatRatio(e.randRead4k.ratio)} (target >= 1.5 for io_uring)`,
      `blk ${name.padEnd(8)} 256 x 4 KiB scattered write: ${(e.pages256.nsPerRequest.tskvm / 1000).toFixed(1)} us/request, C pwritev ${(e.pages256.nsPerRequest.c / 1000).toFixed(1)} us: ratio ${formatRatio(e.pages256.ratio)} (target >= 0.9)`,
    );
  }
  const u = r.cUringReadNs;
  lines.push(typeof u === "string" ? `blk C io_uring reference ${u}` : `blk C io_uring, 64 reads per enter: ${u.median.toFixed(0)} ns/read (${u.min.toFixed(0)}-${u.max.toFixed(0)}; information)`);
  return lines.join("\n");
}

if (require.main === module) {
  runStandalone("bench-blk", { "--rounds": "rounds", "--file-mib": "fileMiB" }, benchBlock, formatBlockBench);
}
