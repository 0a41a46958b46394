/**
 * virtio-blk device-model throughput, in process: requests go through the split virtqueue
 * exactly as a guest would send them (test driver writing descriptors, available ring and
 * headers into real mmap'd guest memory), the VirtioBlock back end serves them with
 * pread/pwrite on a temp image, and the driver collects the used ring. Each figure is set
 * beside plain pread/pwrite of the same sizes, offsets and buffers on the same file in the
 * same run, measured in alternating rounds:
 *
 *   randRead4k   4 KiB reads at random 4 KiB-aligned offsets (page cache), ops/s
 *   seqWrite1m   1 MiB writes, sequential, MB/s
 *   seqWrite1mPages  the same with the 1 MiB in 256 scattered 4 KiB pages (an indirect
 *                table, as Linux sends it): one pwritev per request (information only)
 *
 * `node dist/scripts/bench-blk.js [--file-mib N] [--seconds S]` runs it standalone.
 */
import * as fs from "node:fs";
import * as os from "node:os";
import { join } from "node:path";
import * as sys from "../src/sys/libc";
import { GuestMemory } from "../src/memory/guest-memory";
import { VirtioFeatureBit, feature } from "../src/devices/virtio/types";
import { VirtioBlock } from "../src/devices/virtio/blk/device";
import { VirtioBlkRequest, VirtioBlkStatus } from "../src/devices/virtio/blk/request";
import { openDiskImage } from "../src/host/disk-image";
import { FileBlockEngine } from "../src/host/block-file-engine";
import { VirtqDriver } from "../test/helpers/virtq-driver";
import { runStandalone } from "./lib/standalone";

export interface BlockBenchResult {
  randRead4k: { ops: number; baselineOps: number; ratio: number };
  seqWrite1m: { mbps: number; baselineMbps: number; ratio: number };
  seqWrite1mPages: { mbps: number; baselineMbps: number; ratio: number };
  fileMiB: number;
  batch: { read: number; write: number };
}

export interface BlockBenchOptions {
  /** Size of the temp image (64-256 MiB). */
  fileMiB?: number;
  /** Rough total time budget. */
  seconds?: number;
  /** Where the temp image goes (default: the OS temp dir). */
  dir?: string;
}

const KiB = 1024;
const MiB = 1024 * KiB;
const ROUNDS = 15;
const WARMUP_SECONDS = 1;
const READ_BATCH = 64; // requests per kick (3 descriptors each)
const WRITE_BATCH = 8;

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const now = (): number => Number(process.hrtime.bigint()) / 1e9;

export async function benchBlock(options: BlockBenchOptions = {}): Promise<BlockBenchResult> {
  const fileMiB = Math.min(256, Math.max(64, options.fileMiB ?? 128));
  const seconds = options.seconds ?? 8;
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
  const mem = GuestMemory.allocate(64 * MiB);
  const image = openDiskImage(path);
  try {
    const dev = new VirtioBlock(new FileBlockEngine(image));
    const drv = new VirtqDriver(mem, { size: 256 });
    let failures = 0;
    dev.activate({
      memory: mem,
      features:
        feature(VirtioFeatureBit.VERSION_1) |
        feature(VirtioFeatureBit.RING_EVENT_IDX) |
        feature(VirtioFeatureBit.RING_INDIRECT_DESC) |
        dev.deviceFeatures,
      queues: [drv.config()],
      signalUsed: () => {},
      needsReset: (r) => {
        throw new Error(`device broke: ${r}`);
      },
    });

    /**
     * Pre-built chains (header, data, status), republished with new sectors. With
     * `pages`, the data is that many separate 4 KiB pages behind an indirect table.
     */
    const build = (count: number, dataBytes: number, write: boolean, pages = 0) =>
      Array.from({ length: count }, () => {
        const hdr = drv.alloc(16);
        const data = drv.alloc(dataBytes + pages * 4 * KiB, 4096);
        const status = drv.alloc(1);
        mem.writeU32(hdr, write ? VirtioBlkRequest.OUT : VirtioBlkRequest.IN);
        // Every other page, so that no two are contiguous.
        const dataBufs =
          pages === 0
            ? [{ addr: data, len: dataBytes, write: !write }]
            : Array.from({ length: pages }, (_, i) => ({ addr: data + 2 * i * 4 * KiB, len: 4 * KiB, write: !write }));
        const head = drv.addChain([{ addr: hdr, len: 16 }, ...dataBufs, { addr: status, len: 1, write: true }], { indirect: pages > 0 });
        return { head, hdr, data: mem.slice(data, dataBytes), status };
      });

    const readChains = build(READ_BATCH, 4 * KiB, false);
    const writeChains = build(WRITE_BATCH, MiB, true);
    const pageChains = build(2, 0, true, MiB / (4 * KiB));
    const blocks4k = fileBytes / (4 * KiB);
    const randomOffsets = Uint32Array.from({ length: 1 << 16 }, () => Math.floor(Math.random() * blocks4k));

    /**
     * Serve `batches` batches through the device; returns requests per second of device
     * time. The driver's part (headers, available ring) is the guest's work, done on a
     * vCPU in a real VM, so only queueNotified (pop, parse, I/O, used ring, the interrupt
     * decision) is timed.
     */
    const runDevice = (chains: typeof readChains, batches: number, offsetOf: (i: number) => number): number => {
      let k = 0;
      let busy = 0;
      for (let b = 0; b < batches; b++) {
        for (const c of chains) {
          const sector = offsetOf(k++) / 512;
          mem.writeU32(c.hdr + 8, sector >>> 0);
          mem.writeU32(c.hdr + 12, Math.floor(sector / 0x100000000));
          drv.publish(c.head);
        }
        const t = now();
        dev.queueNotified(0);
        busy += now() - t;
        drv.skipUsed();
      }
      for (const c of chains) if (mem.readU8(c.status) !== VirtioBlkStatus.OK) failures++;
      return k / busy;
    };
    /** The same transfers with plain pread/pwrite: requests per second. */
    const runBaseline = (chains: typeof readChains, batches: number, offsetOf: (i: number) => number, write: boolean): number => {
      let k = 0;
      const t = now();
      for (let b = 0; b < batches; b++) {
        for (const c of chains) {
          const off = offsetOf(k++);
          if (write) sys.pwrite(image.fd, c.data, off);
          else sys.pread(image.fd, c.data, off);
        }
      }
      return k / (now() - t);
    };

    const readOffset = (i: number): number => randomOffsets[i & 0xffff]! * 4 * KiB;
    const writeOffset = (i: number): number => (i * MiB) % fileBytes;

    /**
     * Alternate baseline and device rounds (swapping which goes first) and compare each
     * pair: on a shared, noisy host the ratio of neighbouring rounds is steadier than the
     * ratio of totals. Reports the medians.
     */
    const measure = (
      perRound: number,
      dev1: (batches: number) => number,
      base1: (batches: number) => number,
    ): { device: number; baseline: number; ratio: number } => {
      // Warm both paths up (the JIT needs a few hundred thousand requests to settle),
      // then size a round on the baseline.
      const warm = now();
      while (now() - warm < WARMUP_SECONDS) {
        base1(16);
        dev1(16);
      }
      let batches = 1;
      for (;;) {
        const t = now();
        base1(batches);
        if (now() - t > perRound) break;
        batches *= 2;
      }
      const d: number[] = [];
      const p: number[] = [];
      const ratios: number[] = [];
      const timed = (f: (b: number) => number): number => f(batches);
      for (let r = 0; r < ROUNDS; r++) {
        let pr: number, dr: number;
        if (r % 2 === 0) {
          pr = timed(base1);
          dr = timed(dev1);
        } else {
          dr = timed(dev1);
          pr = timed(base1);
        }
        p.push(pr);
        d.push(dr);
        ratios.push(dr / pr);
      }
      return { device: median(d), baseline: median(p), ratio: median(ratios) };
    };

    const perRound = seconds / (2 * ROUNDS * 2 * 2);
    const rr = measure(
      perRound,
      (n) => runDevice(readChains, n, readOffset),
      (n) => runBaseline(readChains, n, readOffset, false),
    );
    const sw = measure(
      perRound,
      (n) => runDevice(writeChains, n, writeOffset),
      (n) => runBaseline(writeChains, n, writeOffset, true),
    );
    const swp = measure(
      perRound,
      (n) => runDevice(pageChains, 4 * n, writeOffset),
      (n) => runBaseline(writeChains, n, writeOffset, true),
    );
    if (failures > 0) throw new Error(`${failures} requests failed`);
    const mb = MiB / 1e6;
    return {
      randRead4k: { ops: Math.round(rr.device), baselineOps: Math.round(rr.baseline), ratio: rr.ratio },
      seqWrite1m: { mbps: sw.device * mb, baselineMbps: sw.baseline * mb, ratio: sw.ratio },
      seqWrite1mPages: { mbps: swp.device * mb, baselineMbps: swp.baseline * mb, ratio: swp.ratio },
      fileMiB,
      batch: { read: READ_BATCH, write: WRITE_BATCH },
    };
  } finally {
    image.close();
    mem.free();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

export function formatBlockBench(r: BlockBenchResult): string {
  return [
    `blk randRead4k   device ${r.randRead4k.ops} ops/s, pread ${r.randRead4k.baselineOps} ops/s: ratio ${r.randRead4k.ratio.toFixed(3)} (target >= 0.8)`,
    `blk seqWrite1m   device ${r.seqWrite1m.mbps.toFixed(0)} MB/s, pwrite ${r.seqWrite1m.baselineMbps.toFixed(0)} MB/s: ratio ${r.seqWrite1m.ratio.toFixed(3)} (target >= 0.8)`,
    `blk seqWrite1m in 256 scattered 4 KiB pages: device ${r.seqWrite1mPages.mbps.toFixed(0)} MB/s: ratio ${r.seqWrite1mPages.ratio.toFixed(3)} (information)`,
  ].join("\n");
}

if (require.main === module) {
  runStandalone("bench-blk", { "--file-mib": "fileMiB", "--seconds": "seconds" }, benchBlock, formatBlockBench);
}
