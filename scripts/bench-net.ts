/**
 * virtio-net device-model packet rate over a real TAP, beside raw TAP read/write of the
 * same frames in the same run. Everything happens in a network namespace the benchmark
 * creates and deletes (needs root and /dev/net/tun); no traffic leaves it.
 *
 *   rx  TAP -> guest RX ring: frames are queued on the TAP by a raw AF_PACKET socket bound
 *       to it (untimed), then the device moves them into the RX ring of real mmap'd guest
 *       memory (timed: the device's pollReady calls only; the test driver re-posting
 *       buffers is the guest's work and not counted). Baseline: read(2) of the same frames
 *       from the TAP fd into one buffer.
 *   tx  guest TX ring -> TAP: chains are posted (untimed), then the device drains the ring
 *       into the TAP (timed: queueNotified). Baseline: write(2) of the same frames. The
 *       frames go to a MAC nobody has, so the namespace's kernel drops them early.
 *
 * Each case runs for 64-byte and 1500-byte Ethernet frames (plus the 12-byte virtio-net
 * header), in alternating rounds of device and baseline; medians are reported, and the
 * ratio device/raw (1.0: the device model costs nothing over the system calls).
 *
 * `node dist/scripts/bench-net.js [--rounds N] [--frames N]` runs it standalone.
 */
import * as sys from "../src/sys/libc";
import { GuestMemory } from "../src/memory/guest-memory";
import { VirtioFeatureBit, feature } from "../src/devices/virtio/types";
import { NET_QUEUE_SIZE, VirtioNet, VirtioNetFeature } from "../src/devices/virtio/net/device";
import { configureHostSide, type Tap } from "../src/host/tap";
import { type Buf, VirtqDriver } from "../test/helpers/virtq-driver";
import { NetNs, ipv4, netTestSkipReason, udpFrame } from "../test/helpers/netns";
import { runStandalone } from "./lib/standalone";

export interface NetRate {
  /** Frames per second through the device model. */
  device: number;
  /** Frames per second of plain read(2)/write(2) on the TAP. */
  raw: number;
  ratio: number;
}

export interface NetBenchResult {
  rx64: NetRate;
  rx1500: NetRate;
  tx64: NetRate;
  tx1500: NetRate;
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

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const nowNs = (): bigint => process.hrtime.bigint();

export async function benchNet(options: NetBenchOptions = {}): Promise<NetBenchResult> {
  const why = netTestSkipReason();
  if (why !== undefined) throw new Error(`bench-net: ${why}`);
  const rounds = options.rounds ?? 15;
  const frames = Math.min(options.frames ?? 2048, TXQUEUELEN - 96);
  const ns = NetNs.create("bench");
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

    mem = GuestMemory.allocate(64 * 1024 * 1024);
    const out: Partial<NetBenchResult> = { rounds, framesPerRound: frames };
    for (const size of [64, 1500] as const) {
      out[size === 64 ? "rx64" : "rx1500"] = benchRx(mem, tap, sock, size, frames, rounds);
      out[size === 64 ? "tx64" : "tx1500"] = benchTx(mem, tap, size, frames, rounds);
    }
    return out as NetBenchResult;
  } finally {
    if (sock >= 0) sys.close(sock);
    tap?.close();
    ns.destroy();
    mem?.free();
  }
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

function benchRx(mem: GuestMemory, tap: Tap, sock: number, size: number, frames: number, rounds: number): NetRate {
  const frame = udpFrame(HOST_MAC, GUEST_MAC, ipv4("192.168.100.1"), ipv4("192.168.100.2"), size);
  const buf = new Uint8Array(70 * 1024);
  drainTap(tap, buf);
  const { dev, rx } = makeDevice(mem, tap);
  const bufs = new Map<number, Buf>();
  const post = (b: Buf): void => void bufs.set(rx.add([b]), b);
  for (let i = 0; i < NET_QUEUE_SIZE; i++) post(rx.writable(2048));
  const devRates: number[] = [];
  const rawRates: number[] = [];
  for (let r = 0; r <= rounds; r++) {
    // Device: time only its pollReady calls.
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
    // Raw: read(2) of the same number of frames.
    const q2 = fill(sock, frame, frames);
    let n = 0;
    const t1 = nowNs();
    while (n < q2) if (tap.read(buf) > 0) n++;
    const raw = nowNs() - t1;
    if (r === 0) continue; // warm-up
    devRates.push(queued / (Number(t) / 1e9));
    rawRates.push(q2 / (Number(raw) / 1e9));
  }
  dev.reset();
  return rate(devRates, rawRates);
}

function benchTx(mem: GuestMemory, tap: Tap, size: number, frames: number, rounds: number): NetRate {
  const eth = udpFrame(GUEST_MAC, NOBODY_MAC, ipv4("192.168.100.2"), ipv4("192.168.100.99"), size);
  const withHdr = new Uint8Array(HDR + eth.length);
  withHdr.set(eth, HDR);
  const { dev, tx } = makeDevice(mem, tap);
  const bufs = Array.from({ length: NET_QUEUE_SIZE }, () => tx.readable(withHdr));
  const devRates: number[] = [];
  const rawRates: number[] = [];
  for (let r = 0; r <= rounds; r++) {
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
    let n = 0;
    const t1 = nowNs();
    while (n < frames) if (tap.write(withHdr) > 0) n++;
    const raw = nowNs() - t1;
    if (r === 0) continue;
    devRates.push(frames / (Number(t) / 1e9));
    rawRates.push(frames / (Number(raw) / 1e9));
  }
  dev.reset();
  return rate(devRates, rawRates);
}

function rate(dev: number[], raw: number[]): NetRate {
  const d = median(dev);
  const w = median(raw);
  return { device: Math.round(d), raw: Math.round(w), ratio: Number((d / w).toFixed(3)) };
}

export function formatNetBench(r: NetBenchResult): string {
  const line = (name: string, x: NetRate, raw: string) =>
    `net ${name.padEnd(7)} device ${(x.device / 1000).toFixed(0).padStart(5)} K frames/s, ${raw} ${(x.raw / 1000).toFixed(0).padStart(5)} K/s: ratio ${x.ratio.toFixed(3)}`;
  return [
    line("rx64", r.rx64, "read "),
    line("rx1500", r.rx1500, "read "),
    line("tx64", r.tx64, "write"),
    line("tx1500", r.tx1500, "write"),
  ].join("\n");
}

if (require.main === module) {
  runStandalone("bench-net", { "--rounds": "rounds", "--frames": "frames" }, benchNet, formatNetBench);
}
