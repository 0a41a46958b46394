/**
 * virtio-net against C over a real TAP, in a network namespace the benchmark creates and
 * deletes (needs root and /dev/net/tun; no traffic leaves it). Each figure is set beside a
 * C program (native/net_baseline.c) making one read(2) or write(2) per frame on the same
 * TAP (its fd inherited), in rounds that alternate which goes first; the figure is the
 * ratio to C with its spread over the rounds.
 *
 *   rx  TAP -> guest RX ring: frames are queued on the TAP by a raw AF_PACKET socket bound
 *       to it (untimed), then the device moves them into the RX ring of real mmap'd guest
 *       memory (timed: the device's pollReady and queueNotified calls only; the test
 *       driver re-posting buffers is the guest's work). C: read(2) of each frame.
 *   tx  guest TX ring -> TAP: chains are posted (untimed), then the device drains the ring
 *       into the TAP (timed: queueNotified). C: write(2) of each frame. The frames go to a
 *       MAC nobody has, so the namespace's kernel drops them early.
 *
 * 64-byte and 1500-byte Ethernet frames (plus the 12-byte virtio-net header), for each I/O
 * engine usable here: io_uring (TX: a drain's frames in one io_uring_enter) and sync (a
 * system call per frame).
 *
 * `node dist/scripts/bench-net.js [--rounds N] [--frames N]` runs it standalone.
 */
import * as fs from "node:fs";
import * as os from "node:os";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import * as sys from "../src/sys/libc";
import { IoUring, probeIoUring } from "../src/sys/io-uring";
import { GuestMemory } from "../src/memory/guest-memory";
import { VirtioFeatureBit, feature } from "../src/devices/virtio/types";
import { NET_QUEUE_SIZE, VirtioNet, VirtioNetFeature } from "../src/devices/virtio/net/device";
import { TX_BATCH } from "../src/devices/virtio/net/tx";
import { configureHostSide, type Tap } from "../src/host/tap";
import { type Buf, VirtqDriver } from "../test/helpers/virtq-driver";
import { NetNs, ipv4, netTestSkipReason, udpFrame } from "../test/helpers/netns";
import { buildNative } from "./lib/native";
import { type Spread, formatRatio, paired } from "./lib/rounds";
import { runStandalone } from "./lib/standalone";

export interface NetFigure {
  /** tskvm frames/s over C's, per round. */
  ratio: Spread;
  /** ns per frame: tskvm, C (medians). */
  nsPerFrame: { tskvm: number; c: number };
}

export interface NetBenchResult {
  /** By engine ("io_uring", "sync"), then "rx64", "tx64", "rx1500", "tx1500". */
  engines: Record<string, Record<string, NetFigure>>;
  rounds: number;
  framesPerRound: number;
}

export interface NetBenchOptions {
  rounds?: number;
  /** Frames per round (queued on the TAP at once for rx; at most the TAP's queue). */
  frames?: number;
}

const TAP = "tskbench0";
const TXQUEUELEN = 4096;
const HDR = 12;
const GUEST_MAC = Uint8Array.of(0x52, 0x54, 0x00, 0x12, 0x34, 0x56);
const NOBODY_MAC = Uint8Array.of(0x52, 0x54, 0x00, 0x00, 0x00, 0x99);
/** The source MAC of frames "from the host" (any unicast address will do). */
const HOST_MAC = Uint8Array.of(0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc);

const nowNs = (): bigint => process.hrtime.bigint();

export async function benchNet(options: NetBenchOptions = {}): Promise<NetBenchResult> {
  const why = netTestSkipReason();
  if (why !== undefined) throw new Error(`bench-net: ${why}`);
  const rounds = options.rounds ?? 7;
  const frames = Math.min(options.frames ?? 2048, TXQUEUELEN - 96);
  const cBin = buildNative("net_baseline");
  const ns = NetNs.create("bench");
  const dir = fs.mkdtempSync(join(os.tmpdir(), "tskvm-bench-net-"));
  let tap: Tap | undefined;
  let sock = -1;
  let mem: GuestMemory | undefined;
  try {
    tap = ns.openTap(TAP);
    ns.ip("link", "set", "dev", TAP, "txqueuelen", String(TXQUEUELEN));
    configureHostSide(TAP, "192.168.100.1/24", { netns: ns.name });
    const [link] = ns.ipJson<{ ifindex: number }[]>("link", "show", "dev", TAP);
    const ifindex = link!.ifindex;
    // A raw packet socket in the namespace, bound to the TAP: what it sends, the TAP reads.
    sock = ns.enter(() => sys.socket(sys.AF_PACKET, sys.SOCK_RAW | sys.SOCK_NONBLOCK, 0));
    const sll = new Uint8Array(20);
    const sv = new DataView(sll.buffer);
    sv.setUint16(0, sys.AF_PACKET, true);
    sv.setInt32(4, ifindex, true);
    sys.bind(sock, sll);
    const theTap = tap;
    const theSock = sock;
    /** One C round: ns per frame as the program measured it (TAP and socket as fds 3 and 4). */
    const c = (mode: "rx" | "tx", frame: Uint8Array): number => {
      const file = join(dir, `${mode}-${frame.length}.frame`);
      if (!fs.existsSync(file)) fs.writeFileSync(file, frame);
      if (mode === "rx") drainTap(theTap, new Uint8Array(70 * 1024));
      const r = spawnSync(cBin, ["--mode", mode, "--tap-fd", "3", "--sock-fd", "4", "--frame-file", file, "--frames", String(frames)], {
        encoding: "utf8",
        stdio: ["ignore", "pipe", "pipe", theTap.fd, theSock],
      });
      if (r.status !== 0) throw new Error(`net_baseline ${mode} failed: ${r.stderr.trim()}`);
      return (JSON.parse(r.stdout) as { nsPerFrame: number }).nsPerFrame;
    };

    mem = GuestMemory.allocate(64 * 1024 * 1024);
    const engines: Record<string, Record<string, NetFigure>> = {};
    const names = probeIoUring().available ? ["io_uring", "sync"] : ["sync"];
    for (const engine of names) {
      const ring = engine === "io_uring" ? IoUring.create(TX_BATCH) : undefined;
      tap.useRing(ring);
      const figures: Record<string, NetFigure> = {};
      try {
        for (const size of [64, 1500] as const) {
          const rx = rxRounds(mem, tap, sock, size, frames);
          const rxFrame = udpFrame(HOST_MAC, GUEST_MAC, ipv4("192.168.100.1"), ipv4("192.168.100.2"), size);
          figures[`rx${size}`] = figure(await paired(rounds, rx.round, () => c("rx", rxFrame), { lowerIsBetter: true }));
          rx.done();
          const tx = txRounds(mem, tap, size, frames);
          figures[`tx${size}`] = figure(await paired(rounds, tx.round, () => c("tx", tx.frame), { lowerIsBetter: true }));
          tx.done();
        }
      } finally {
        tap.useRing(undefined);
        ring?.close();
      }
      engines[engine] = figures;
    }
    return { engines, rounds, framesPerRound: frames };
  } finally {
    if (sock >= 0) sys.close(sock);
    tap?.close();
    ns.destroy();
    mem?.free();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

function figure(p: { ratio: Spread; subject: Spread; baseline: Spread }): NetFigure {
  return { ratio: p.ratio, nsPerFrame: { tskvm: p.subject.median, c: p.baseline.median } };
}

function makeDevice(mem: GuestMemory, tap: Tap): { dev: VirtioNet; rx: VirtqDriver; tx: VirtqDriver } {
  const rx = new VirtqDriver(mem, { size: NET_QUEUE_SIZE, index: 0, ringBase: 0x10000, dataBase: 0x100000, dataEnd: 0x1000000 });
  const tx = new VirtqDriver(mem, { size: NET_QUEUE_SIZE, index: 1, ringBase: 0x20000, dataBase: 0x1000000, dataEnd: 0x3000000 });
  const dev = new VirtioNet(tap, { mac: GUEST_MAC });
  dev.activate({
    memory: mem,
    features: feature(VirtioFeatureBit.VERSION_1) | feature(VirtioFeatureBit.RING_EVENT_IDX) | feature(VirtioNetFeature.MRG_RXBUF),
    queues: [rx.config(), tx.config()],
    signalUsed: () => {},
    needsReset: (r) => {
      throw new Error(`bench-net: device needs reset: ${r}`);
    },
  });
  return { dev, rx, tx };
}

/** Queue `count` frames on the TAP through the packet socket; returns how many went. */
function fill(sock: number, frame: Uint8Array, count: number): number {
  for (let i = 0; i < count; i++) if (sys.write(sock, frame) < 0) return i;
  return count;
}

/** Read whatever the TAP still holds (between rounds). */
function drainTap(tap: Tap, buf: Uint8Array): void {
  while (tap.read(buf) > 0) {
    // discard
  }
}

/** RX through the device: a round queues `frames` frames and times the device moving them. */
function rxRounds(mem: GuestMemory, tap: Tap, sock: number, size: number, frames: number): { round: () => number; done: () => void } {
  const frame = udpFrame(HOST_MAC, GUEST_MAC, ipv4("192.168.100.1"), ipv4("192.168.100.2"), size);
  const buf = new Uint8Array(70 * 1024);
  const { dev, rx } = makeDevice(mem, tap);
  const bufs = new Map<number, Buf>();
  const post = (b: Buf): void => void bufs.set(rx.add([b]), b);
  for (let i = 0; i < NET_QUEUE_SIZE; i++) post(rx.writable(2048));
  const round = (): number => {
    drainTap(tap, buf);
    const queued = fill(sock, frame, frames);
    const start = dev.stats.rxFrames;
    let t = 0n;
    while (dev.stats.rxFrames - start < queued) {
      const t0 = nowNs();
      dev.pollReady(tap.fd, sys.POLLIN);
      t += nowNs() - t0;
      const used = rx.used();
      if (used.length === 0 && dev.pollFds().length === 0) throw new Error("bench-net: rx stalled");
      for (const u of used) {
        const b = bufs.get(u.id)!;
        bufs.delete(u.id);
        post(b);
      }
      // The guest's kick after refilling: the device carries on reading the TAP (timed).
      const t1 = nowNs();
      dev.queueNotified(0);
      t += nowNs() - t1;
    }
    return Number(t) / queued;
  };
  round(); // warm-up
  return { round, done: () => dev.reset() };
}

/** TX through the device: a round posts `frames` frames (in ring-sized runs) and times the device sending them. */
function txRounds(mem: GuestMemory, tap: Tap, size: number, frames: number): { round: () => number; done: () => void; frame: Uint8Array } {
  const eth = udpFrame(GUEST_MAC, NOBODY_MAC, ipv4("192.168.100.2"), ipv4("192.168.100.99"), size);
  const withHdr = new Uint8Array(HDR + eth.length);
  withHdr.set(eth, HDR);
  const { dev, tx } = makeDevice(mem, tap);
  const bufs = Array.from({ length: NET_QUEUE_SIZE }, () => tx.readable(withHdr));
  const round = (): number => {
    const start = dev.stats.txFrames;
    let t = 0n;
    while (dev.stats.txFrames - start < frames) {
      const batch = Math.min(NET_QUEUE_SIZE, frames - (dev.stats.txFrames - start));
      for (let i = 0; i < batch; i++) tx.add([bufs[i]!]);
      const t0 = nowNs();
      dev.queueNotified(1);
      t += nowNs() - t0;
      if (tx.used().length !== batch) throw new Error("bench-net: tx stalled");
    }
    return Number(t) / frames;
  };
  round();
  return { round, done: () => dev.reset(), frame: withHdr };
}

export function formatNetBench(r: NetBenchResult): string {
  const lines: string[] = [];
  for (const [engine, figs] of Object.entries(r.engines)) {
    for (const [name, x] of Object.entries(figs)) {
      const call = name.startsWith("rx") ? "read" : "write";
      lines.push(
        `net ${engine.padEnd(8)} ${name.padEnd(6)} ${x.nsPerFrame.tskvm.toFixed(0).padStart(5)} ns/frame, C ${call} ${x.nsPerFrame.c.toFixed(0).padStart(5)} ns: ratio ${formatRatio(x.ratio)} (target >= 0.9)`,
      );
    }
  }
  return lines.join("\n");
}

if (require.main === module) {
  runStandalone("bench-net", { "--rounds": "rounds", "--frames": "frames" }, benchNet, formatNetBench);
}
