/**
 * virtio-net over a real TAP, in a network namespace this test creates (addresses only
 * inside it; the namespace, and with it the TAP, is deleted afterwards). A fake guest
 * (rings in fake guest memory, MAC 52:54:00:12:34:56, IP 192.168.100.2) talks to the
 * namespace's kernel at 192.168.100.1 through the device: ARP and ICMP echo answered by
 * the kernel come back through the TAP into the RX ring; ARP and UDP from the namespace
 * arrive in the RX ring; UDP from the guest reaches a socket in the namespace, also with a
 * partial checksum (VIRTIO_NET_HDR_F_NEEDS_CSUM) for the kernel to accept.
 *
 * Skipped, saying why, when not root or without /dev/net/tun.
 */
import { after, afterEach, before, beforeEach, describe, it } from "node:test";
import { IoUring, probeIoUring } from "../../src/sys/io-uring";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { GuestMemory } from "../../src/memory/guest-memory";
import { type VirtioActivation, VirtioFeatureBit, feature } from "../../src/devices/virtio/types";
import { NET_QUEUE_SIZE, VirtioNet, VirtioNetFeature } from "../../src/devices/virtio/net/device";
import { NetHdr, VIRTIO_NET_HDR_F_NEEDS_CSUM } from "../../src/devices/virtio/net/header";
import { parseMac } from "../../src/api/option-values";
import { type Tap, configureHostSide } from "../../src/host/tap";
import * as sys from "../../src/sys/libc";
import { type Buf, VirtqDriver } from "../helpers/virtq-driver";
import { ETH_P_ARP, ETH_P_IP, NetNs, arpFrame, icmpEcho, inetChecksum, ipv4, netTestSkipReason, udpFrame } from "../helpers/netns";

const skip = netTestSkipReason();
const TAP = "tsknet0";
const HOST_IP = ipv4("192.168.100.1");
const GUEST_IP = ipv4("192.168.100.2");
const GUEST_MAC = parseMac("52:54:00:12:34:56");
const V1 = feature(VirtioFeatureBit.VERSION_1);
const MRG = feature(VirtioNetFeature.MRG_RXBUF);
const OFFLOADS = [VirtioNetFeature.CSUM, VirtioNetFeature.GUEST_CSUM, VirtioNetFeature.GUEST_TSO4, VirtioNetFeature.GUEST_TSO6].reduce((a, b) => a | feature(b), 0n);

const eq = (a: Uint8Array, b: Uint8Array): boolean => a.length === b.length && a.every((x, i) => x === b[i]);
const u16 = (b: Uint8Array, o: number): number => (b[o]! << 8) | b[o + 1]!;

interface Received {
  hdr: Uint8Array;
  eth: Uint8Array;
  /** RX buffers the frame took (num_buffers) and the bytes in each. */
  lens: number[];
}

/** The guest side: rings in fake memory, RX buffers kept posted, ARP for its own IP answered. */
class FakeGuest {
  readonly mem: GuestMemory;
  readonly rx: VirtqDriver;
  readonly tx: VirtqDriver;
  readonly dev: VirtioNet;
  readonly received: Received[] = [];
  readonly resets: string[] = [];
  private readonly bufs = new Map<number, Buf>();
  private partial: { need: number; parts: Uint8Array[] } | undefined;
  hostMac = new Uint8Array(6);

  /** inPlace: mmap'd memory, so the device reads and writes frames in place (readv/writev). */
  constructor(
    readonly tap: Tap,
    features: bigint,
    inPlace: boolean,
  ) {
    this.mem = inPlace ? GuestMemory.allocate(16 * 1024 * 1024) : GuestMemory.forTest(16 * 1024 * 1024);
    this.rx = new VirtqDriver(this.mem, { size: NET_QUEUE_SIZE, index: 0, ringBase: 0x10000, dataBase: 0x100000, dataEnd: 0x600000 });
    this.tx = new VirtqDriver(this.mem, { size: NET_QUEUE_SIZE, index: 1, ringBase: 0x20000, dataBase: 0x600000, dataEnd: 0xf00000 });
    this.dev = new VirtioNet(tap, { mac: GUEST_MAC });
    const ctx: VirtioActivation = {
      memory: this.mem,
      features: features & (this.dev.deviceFeatures | V1),
      queues: [this.rx.config(), this.tx.config()],
      signalUsed: () => {},
      needsReset: (r) => this.resets.push(r),
    };
    this.dev.activate(ctx);
    for (let i = 0; i < 64; i++) this.post(this.rx.writable(2048));
  }

  private post(b: Buf): void {
    this.bufs.set(this.rx.add([b]), b);
  }

  /** Send an Ethernet frame with a virtio-net header (default: all zero). */
  send(eth: Uint8Array, hdr: Uint8Array = new Uint8Array(12)): void {
    const b = new Uint8Array(hdr.length + eth.length);
    b.set(hdr);
    b.set(eth, hdr.length);
    this.tx.add([this.tx.readable(b)]);
    this.dev.queueNotified(1);
    this.tx.used();
  }

  /** Run the I/O worker's part for up to `ms`: poll the TAP, deliver, collect frames, re-post buffers. */
  pollOnce(ms: number): void {
    const fds = this.dev.pollFds();
    if (fds.length > 0) {
      const rev = sys.pollOne(fds[0]!.fd, fds[0]!.events, ms);
      if (rev !== 0) this.dev.pollReady(fds[0]!.fd, rev);
    }
    for (const u of this.rx.used()) {
      const b = this.bufs.get(u.id)!;
      this.bufs.delete(u.id);
      const bytes = this.mem.slice(b.addr, u.len).slice();
      this.post(b);
      // A frame over several buffers (MRG_RXBUF): the first says how many (num_buffers).
      const p = (this.partial ??= { need: bytes[NetHdr.NUM_BUFFERS]! | (bytes[NetHdr.NUM_BUFFERS + 1]! << 8), parts: [] });
      p.parts.push(bytes);
      if (p.parts.length < p.need) continue;
      this.partial = undefined;
      const all = new Uint8Array(Buffer.concat(p.parts));
      this.received.push({ hdr: all.subarray(0, 12), eth: all.subarray(12), lens: p.parts.map((x) => x.length) });
    }
  }

  /** Wait for a received frame matching `pred`, answering ARP requests for the guest's IP meanwhile. */
  waitFor(what: string, pred: (eth: Uint8Array, hdr: Uint8Array) => boolean, ms = 5000): Received {
    const end = Date.now() + ms;
    let seen = 0;
    while (Date.now() < end) {
      this.pollOnce(20);
      for (; seen < this.received.length; seen++) {
        const r = this.received[seen]!;
        if (isArp(r.eth, 1) && eq(r.eth.subarray(38, 42), GUEST_IP)) {
          this.send(arpFrame(2, GUEST_MAC, GUEST_IP, r.eth.subarray(6, 12), r.eth.subarray(28, 32)));
        }
        if (pred(r.eth, r.hdr)) return r;
      }
    }
    throw new Error(`timed out waiting for ${what}; received ${this.received.length} frames: ${this.received.map((r) => frameSummary(r.eth)).join(", ")}`);
  }
}

/** The guest is done: reset the device, unmap its memory. */
function close(g: FakeGuest): void {
  g.dev.reset();
  g.mem.free();
}

const isArp = (eth: Uint8Array, op: number): boolean => u16(eth, 12) === ETH_P_ARP && u16(eth, 20) === op;
const isIp = (eth: Uint8Array, proto: number): boolean => u16(eth, 12) === ETH_P_IP && eth[23] === proto;
const frameSummary = (eth: Uint8Array): string => `type 0x${u16(eth, 12).toString(16)} len ${eth.length}`;

/** A UDP listener inside the namespace: resolves with the first datagram's payload. */
function udpListener(ns: NetNs, port: number): { ready: Promise<void>; datagram: Promise<string>; kill(): void } {
  const script =
    `const s = require("node:dgram").createSocket("udp4");` +
    `s.on("message", (m) => { process.stdout.write("got " + m.toString("hex") + "\\n"); process.exit(0); });` +
    `s.bind(${port}, "192.168.100.1", () => process.stdout.write("ready\\n"));` +
    `setTimeout(() => process.exit(3), 15000);`;
  const child = spawn("ip", ["netns", "exec", ns.name, process.execPath, "-e", script], { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  let err = "";
  child.stderr.on("data", (d) => (err += d));
  const ready = new Promise<void>((resolve, reject) => {
    child.stdout.on("data", (d) => {
      out += d;
      if (out.includes("ready\n")) resolve();
    });
    child.on("exit", (code) => reject(new Error(`listener exited ${code}: ${err}`)));
  });
  const datagram = new Promise<string>((resolve, reject) => {
    child.on("exit", (code) => {
      const m = /got ([0-9a-f]*)/.exec(out);
      if (m !== null) resolve(Buffer.from(m[1]!, "hex").toString());
      else reject(new Error(`listener exited ${code} without a datagram: ${err}`));
    });
  });
  return { ready, datagram, kill: () => child.kill("SIGKILL") };
}

/** Let the event loop run (the guest loop is synchronous) while `p` settles. */
async function settle<T>(g: FakeGuest, p: Promise<T>, ms = 5000): Promise<T> {
  let done = false;
  void p.then(
    () => (done = true),
    () => (done = true),
  );
  const end = Date.now() + ms;
  while (!done && Date.now() < end) {
    g.pollOnce(5);
    await new Promise((r) => setTimeout(r, 5));
  }
  return p;
}

describe("virtio-net over a real TAP in a network namespace", { skip: skip ?? false }, () => {
  let ns: NetNs;
  let tap: Tap;
  let hostMac: Uint8Array;

  before(() => {
    ns = NetNs.create("net");
    tap = ns.openTap(TAP);
    configureHostSide(TAP, "192.168.100.1/24", { netns: ns.name });
    const [link] = ns.ipJson<{ address: string }[]>("link", "show", "dev", TAP);
    hostMac = parseMac(link!.address);
  });
  after(() => {
    tap?.close();
    ns?.destroy();
  });

  for (const mode of ["copied", "in place", "io_uring"] as const) {
    const inPlace = mode !== "copied";
    const how =
      mode === "copied" ? "copied (test memory)" : mode === "in place" ? "in place (mmap'd memory, readv/writev)" : "in place, TX batches through io_uring";
    let ring: IoUring | undefined;
    beforeEach(() => {
      if (mode !== "io_uring" || !probeIoUring().available) return;
      ring = IoUring.create(64);
      tap.useRing(ring);
    });
    afterEach(() => {
      tap.useRing(undefined);
      ring?.close();
      ring = undefined;
    });
    it(`the guest's ARP request and ICMP echo are answered by the namespace's kernel, back through the RX ring, ${how}`, () => {
      const g = new FakeGuest(tap, V1 | MRG, inPlace);
      const before = ns.linkStats(TAP);
      g.send(arpFrame(1, GUEST_MAC, GUEST_IP, new Uint8Array(6), HOST_IP));
      const reply = g.waitFor("the ARP reply", (eth) => isArp(eth, 2));
      assert.deepEqual(reply.eth.subarray(22, 28), hostMac, "sender MAC: the TAP's");
      assert.deepEqual(reply.eth.subarray(28, 32), HOST_IP);
      assert.deepEqual(reply.eth.subarray(0, 6), GUEST_MAC, "sent to the guest");
      assert.ok(ns.linkStats(TAP).rxPackets > before.rxPackets, "the kernel counted the frame the device wrote");

      const payload = Buffer.from("tskvm virtio-net echo");
      g.send(icmpEcho(GUEST_MAC, hostMac, GUEST_IP, HOST_IP, 0x1234, 7, payload));
      const echo = g.waitFor("the ICMP echo reply", (eth) => isIp(eth, 1) && eth[34] === 0 && u16(eth, 38) === 0x1234);
      assert.equal(u16(echo.eth, 40), 7);
      assert.deepEqual(Buffer.from(echo.eth.subarray(42, 42 + payload.length)), payload);
      assert.equal(echo.hdr[NetHdr.FLAGS], 0, "no GUEST_CSUM: flags 0");
      assert.equal(inetChecksum(echo.eth, 34, echo.eth.length), 0, "a complete checksum");
      assert.deepEqual(g.resets, []);
      close(g);
    });

    it(`a datagram sent from the namespace to the guest's address: its ARP request, then the datagram, arrive in the RX ring, ${how}`, () => {
      const g = new FakeGuest(tap, V1 | MRG, inPlace);
      ns.ip("neigh", "flush", "dev", TAP);
      ns.exec(["bash", "-c", "echo hello guest > /dev/udp/192.168.100.2/9"]);
      const arp = g.waitFor("the namespace's ARP request", (eth) => isArp(eth, 1) && eq(eth.subarray(38, 42), GUEST_IP));
      assert.deepEqual(arp.eth.subarray(28, 32), HOST_IP);
      // waitFor answered it; the kernel then sends the datagram it held back.
      const udp = g.waitFor("the UDP datagram", (eth) => isIp(eth, 17) && u16(eth, 36) === 9);
      assert.deepEqual(udp.eth.subarray(0, 6), GUEST_MAC);
      assert.equal(Buffer.from(udp.eth.subarray(42, 42 + 12)).toString(), "hello guest\n");
      close(g);
    });

    it(`a 7 KB frame (MTU 9000) from the namespace spreads over several RX buffers, ${how}`, () => {
      const g = new FakeGuest(tap, V1 | MRG, inPlace);
      ns.ip("link", "set", "dev", TAP, "mtu", "9000");
      try {
        g.send(arpFrame(1, GUEST_MAC, GUEST_IP, new Uint8Array(6), HOST_IP)); // so the kernel knows the guest's MAC
        g.waitFor("the ARP reply", (eth) => isArp(eth, 2));
        const script = `const s = require("node:dgram").createSocket("udp4"); s.send(Buffer.alloc(7000, 0x78), 9, "192.168.100.2", () => s.close());`;
        ns.exec([process.execPath, "-e", script]);
        const big = g.waitFor("the 7000-byte datagram", (eth) => isIp(eth, 17) && u16(eth, 36) === 9);
        assert.equal(big.eth.length, 14 + 20 + 8 + 7000, "one frame, not IP fragments");
        assert.ok(big.eth.subarray(42).every((b) => b === 0x78));
        assert.deepEqual(big.lens, [2048, 2048, 2048, 12 + big.eth.length - 3 * 2048], "num_buffers 4, the buffers filled in order");
      } finally {
        ns.ip("link", "set", "dev", TAP, "mtu", "1500");
        close(g);
      }
    });

    it(`with offloads negotiated the TAP hands over partial checksums, and takes them from the guest, ${how}`, async () => {
      const g = new FakeGuest(tap, V1 | MRG | OFFLOADS, inPlace);
      assert.equal(g.dev.offloads, true, "this kernel's TAP takes TUNSETOFFLOAD");
      // Host -> guest: a locally generated datagram leaves the checksum to the "NIC".
      ns.exec(["bash", "-c", "echo partial > /dev/udp/192.168.100.2/9"]);
      const udp = g.waitFor("the UDP datagram", (eth) => isIp(eth, 17) && u16(eth, 36) === 9);
      assert.equal(udp.hdr[NetHdr.FLAGS]! & VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_F_NEEDS_CSUM, "NEEDS_CSUM passed through");
      const hv = new DataView(udp.hdr.buffer, udp.hdr.byteOffset);
      assert.equal(hv.getUint16(NetHdr.CSUM_START, true), 34, "checksum starts at the UDP header");
      assert.equal(hv.getUint16(NetHdr.CSUM_OFFSET, true), 6, "UDP checksum field");

      // Guest -> host: a datagram with only the pseudo-header sum, NEEDS_CSUM for the kernel to finish.
      const l = udpListener(ns, 5555);
      await l.ready;
      const text = "from the guest, checksum offloaded";
      const fr = udpFrame(GUEST_MAC, hostMac, GUEST_IP, HOST_IP, 42 + text.length);
      fr.set(Buffer.from(text), 42);
      new DataView(fr.buffer).setUint16(36, 5555);
      const udpLen = fr.length - 34;
      const pseudo = new Uint8Array(12);
      pseudo.set(GUEST_IP, 0);
      pseudo.set(HOST_IP, 4);
      pseudo[9] = 17;
      new DataView(pseudo.buffer).setUint16(10, udpLen);
      new DataView(fr.buffer).setUint16(40, ~inetChecksum(pseudo) & 0xffff); // the unfolded partial sum
      const hdr = new Uint8Array(12);
      hdr[NetHdr.FLAGS] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
      new DataView(hdr.buffer).setUint16(NetHdr.CSUM_START, 34, true);
      new DataView(hdr.buffer).setUint16(NetHdr.CSUM_OFFSET, 6, true);
      g.send(fr, hdr);
      try {
        assert.equal(await settle(g, l.datagram), text);
      } finally {
        l.kill();
      }
      assert.deepEqual(g.resets, []);
      close(g);
    });
  }
});
