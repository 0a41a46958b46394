/**
 * One request per kick, end to end: how long a guest waits for one virtio-blk read when it
 * sends one at a time. A driver thread (native/kick_loop.c) plays the guest: it publishes a
 * 4 KiB read on a split virtqueue in shared guest memory, writes the queue's kick eventfd
 * (what KVM's ioeventfd does on the guest's notify write), and sleeps in poll(2) on the
 * interrupt eventfd (what irqfd injects) until the used ring has the request.
 *
 *   tskvm  the device side is tskvm's own I/O worker thread (src/io/io-worker.ts) running
 *          virtio-blk on the same image: its wake-up, the device model, the engine, and
 *          the interrupt (INTx through its irqfd, here the eventfd the driver waits on)
 *   C      kick_loop's own device thread: poll, read the eventfd, pread, used ring, write
 *          the interrupt eventfd: the least a device must do
 *
 * The driver is the same C code in both, so the difference is the device's path. Rounds
 * alternate; the figure is C's time per request over tskvm's (1 = as fast as C; the target
 * is tskvm within 1.3x of C, a ratio of 0.77 or more), with its spread.
 *
 * `node dist/scripts/bench-kick.js [--rounds N] [--requests N]` runs it standalone.
 */
import * as fs from "node:fs";
import * as os from "node:os";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import * as sys from "../src/sys/libc";
import { probeIoUring } from "../src/sys/io-uring";
import { GuestMemory } from "../src/memory/guest-memory";
import { blkDescription } from "../src/devices/virtio/blk/device";
import { VirtioPciTransport } from "../src/devices/virtio/pci-transport";
import * as L from "../src/devices/virtio/transport-layout";
import { VirtioStatus } from "../src/devices/virtio/types";
import { openDiskImage } from "../src/host/disk-image";
import type { IoEngineName } from "../src/host/io-engine";
import { IoThread, createIoControl } from "../src/io/io-thread";
import type { VirtioFunctionSpec } from "../src/board/virtio-devices";
import { buildNative } from "./lib/native";
import { type Spread, formatRatio, paired } from "./lib/rounds";
import { runStandalone } from "./lib/standalone";

export interface KickBenchResult {
  /** By engine: tskvm's and C's microseconds per request, and C's over tskvm's per round. */
  engines: Record<string, { usPerRequest: { tskvm: number; c: number }; ratio: Spread }>;
  rounds: number;
  requestsPerRound: number;
}

export interface KickBenchOptions {
  rounds?: number;
  requests?: number;
}

const MiB = 1024 * 1024;
/** Guest RAM shared with the driver: kick_loop.c's layout (rings at 0x10000.., buffers at 1 MiB). */
const MEM_BYTES = 2 * MiB;
const SEED = 0x1f123bb5;

export async function benchKick(options: KickBenchOptions = {}): Promise<KickBenchResult> {
  const rounds = options.rounds ?? 5;
  const requests = options.requests ?? 5000;
  const bin = buildNative("kick_loop");
  const dir = fs.mkdtempSync(join(os.tmpdir(), "tskvm-bench-kick-"));
  const image = join(dir, "disk.img");
  fs.writeFileSync(image, Buffer.alloc(32 * MiB, 0x5a));
  const c = (): number => {
    const r = spawnSync(bin, ["--device", "c", "--file", image, "--requests", String(requests), "--warmup", String(requests / 10), "--seed", String(SEED)], { encoding: "utf8" });
    if (r.status !== 0) throw new Error(`kick_loop failed: ${r.stderr.trim()}`);
    return (JSON.parse(r.stdout) as { usPerRequest: number }).usPerRequest;
  };
  const engines: KickBenchResult["engines"] = {};
  try {
    for (const engine of (probeIoUring().available ? ["io_uring", "sync"] : ["sync"]) as IoEngineName[]) {
      const served = await withIoWorker(dir, image, engine, (memFd, kickFd, irqFd) => () => {
        const r = spawnSync(bin, ["--device", "none", "--file", image, "--requests", String(requests), "--warmup", String(requests / 10), "--seed", String(SEED), "--kick-fd", "3", "--irq-fd", "4", "--mem-fd", "5"], {
          encoding: "utf8",
          stdio: ["ignore", "pipe", "pipe", kickFd, irqFd, memFd],
        });
        if (r.status !== 0) throw new Error(`kick_loop --device none failed: ${r.stderr.trim()}`);
        return (JSON.parse(r.stdout) as { usPerRequest: number }).usPerRequest;
      }, async (tskvm) => paired(rounds, tskvm, c, { lowerIsBetter: true }));
      engines[engine] = { usPerRequest: { tskvm: served.subject.median, c: served.baseline.median }, ratio: served.ratio };
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return { engines, rounds, requestsPerRound: requests };
}

/**
 * tskvm's I/O worker serving virtio-blk on `image` over shared guest memory, its queue set
 * up as a driver would (modern virtio-pci registers: features, queue 0, DRIVER_OK, INTx).
 * `round` is made with the fds the driver needs; `run` measures with it.
 */
async function withIoWorker<T>(
  dir: string,
  image: string,
  engine: IoEngineName,
  makeRound: (memFd: number, kickFd: number, irqFd: number) => () => number,
  run: (round: () => number) => Promise<T>,
): Promise<T> {
  const memPath = join(dir, "ram");
  fs.writeFileSync(memPath, Buffer.alloc(MEM_BYTES));
  const memFd = sys.open(memPath, sys.O_RDWR);
  const host = sys.mmap(MEM_BYTES, sys.PROT_READ | sys.PROT_WRITE, sys.MAP_SHARED, memFd, 0);
  const memory = GuestMemory.attach([{ base: 0, size: MEM_BYTES, hostAddress: host }]);
  const disk = openDiskImage(image, { readOnly: true });
  const fds = [sys.eventfd(0, sys.EFD_NONBLOCK), sys.eventfd(0, sys.EFD_NONBLOCK), sys.eventfd(0, sys.EFD_NONBLOCK), sys.eventfd(0, sys.EFD_NONBLOCK)];
  const [kickFd, irqFd, resampleFd, controlFd] = fds as [number, number, number, number];
  const diskSpec = { fd: disk.fd, sizeBytes: disk.sizeBytes, readOnly: true, path: image, serial: "bench", engine };
  const state = VirtioPciTransport.createState(blkDescription(diskSpec));
  driverSetUp(new VirtioPciTransport(state, { kick: () => undefined, reset: () => undefined, driverOk: () => undefined, notifyAddressChanged: () => undefined, msixUnmasked: () => undefined }));
  const fn: VirtioFunctionSpec = {
    name: "virtio-blk (bench)",
    slot: { device: 1, intxPin: 0, gsi: 16 },
    device: { kind: "virtio-blk", disk: diskSpec },
    transport: state,
    kickFds: [kickFd],
    intxFd: irqFd,
    resampleFd,
  };
  const io = new IoThread({ memory: memory.describe(), vmFd: -1, controlFd, control: createIoControl(), devices: [fn] });
  io.onWarning = (m) => process.stderr.write(`bench-kick: ${m}\n`);
  io.start();
  sys.signalEventfd(controlFd);
  try {
    const result = await run(makeRound(memFd, kickFd, irqFd));
    if (io.failure !== undefined) throw new Error(`I/O worker failed: ${io.failure}`);
    return result;
  } finally {
    await io.stop();
    for (const fd of fds) sys.close(fd);
    disk.close();
    sys.munmap(host, MEM_BYTES);
    sys.close(memFd);
  }
}

/** What a guest's virtio-pci driver writes to set the device up: VERSION_1, queue 0 as kick_loop lays it out, DRIVER_OK. */
function driverSetUp(t: VirtioPciTransport): void {
  const w = (offset: number, size: number, value: number) => {
    const d = new Uint8Array(size);
    for (let i = 0; i < size; i++) d[i] = (value >>> (8 * i)) & 0xff;
    t.barWrite(L.MODERN_BAR, offset, d);
  };
  const S = VirtioStatus;
  w(L.COMMON_STATUS, 1, 0);
  w(L.COMMON_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER);
  w(L.COMMON_GFSELECT, 4, 1);
  w(L.COMMON_GF, 4, 1); // VIRTIO_F_VERSION_1; no EVENT_IDX: an interrupt per request
  w(L.COMMON_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
  w(L.COMMON_Q_SELECT, 2, 0);
  w(L.COMMON_Q_SIZE, 2, 256);
  w(L.COMMON_Q_DESCLO, 4, 0x10000);
  w(L.COMMON_Q_AVAILLO, 4, 0x11000);
  w(L.COMMON_Q_USEDLO, 4, 0x12000);
  w(L.COMMON_Q_ENABLE, 2, 1);
  w(L.COMMON_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
}

export function formatKickBench(r: KickBenchResult): string {
  return Object.entries(r.engines)
    .map(
      ([engine, e]) =>
        `kick ${engine.padEnd(8)} one 4 KiB read per kick, kick to interrupt: tskvm ${e.usPerRequest.tskvm.toFixed(1)} us, C ${e.usPerRequest.c.toFixed(1)} us: ratio ${formatRatio(e.ratio)} (target >= 0.77, i.e. within 1.3x of C)`,
    )
    .join("\n");
}

if (require.main === module) {
  runStandalone("bench-kick", { "--rounds": "rounds", "--requests": "requests" }, benchKick, formatKickBench);
}
