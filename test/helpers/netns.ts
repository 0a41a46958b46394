/**
 * Network namespaces for tests and the network benchmark: every TAP a test makes lives in
 * a namespace the test created, with addresses only inside it, and the namespace is
 * deleted afterwards (also at process exit, and namespaces left by a killed run of this
 * helper are swept the next time one is created). Deleting a namespace deletes the TAP,
 * dummy and veth interfaces in it.
 *
 * NetNs.enter(fn) runs fn with the calling thread inside the namespace (setns), so that
 * /dev/net/tun, sockets and spawned commands opened by fn belong to it; the TAP fd keeps
 * working after the thread has gone back.
 */
import { type SpawnSyncReturns, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as sys from "../../src/sys/libc";
import { type OpenTapOptions, type Tap, openTap } from "../../src/host/tap";

const PREFIX = "tskvm-";
const RUN_NETNS = "/run/netns";
let counter = 0;
const live = new Set<NetNs>();
let exitHook = false;

/** Why network tests cannot run here, or undefined when they can. */
export function netTestSkipReason(): string | undefined {
  if (process.platform !== "linux") return "network tests need Linux";
  if (process.getuid?.() !== 0) return "network tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to make a namespace and TAP devices";
  if (!fs.existsSync("/dev/net/tun")) return "/dev/net/tun is missing (modprobe tun)";
  const ip = spawnSync("ip", ["-V"], { encoding: "utf8" });
  if (ip.error !== undefined) return "network tests need iproute2's `ip`";
  if (cachedProbe === undefined) {
    const name = `${PREFIX}probe-${process.pid}`;
    const r = spawnSync("ip", ["netns", "add", name], { encoding: "utf8" });
    if (r.status !== 0) cachedProbe = `cannot create a network namespace: ${(r.stderr || "").trim()}`;
    else {
      spawnSync("ip", ["netns", "del", name]);
      cachedProbe = "";
    }
  }
  return cachedProbe === "" ? undefined : cachedProbe;
}
let cachedProbe: string | undefined;

export class NetNs {
  private destroyed = false;

  private constructor(readonly name: string) {}

  /** A fresh namespace with lo up and IPv6 off (so no router solicitations on our TAPs). */
  static create(tag = "t"): NetNs {
    sweepStale();
    const name = `${PREFIX}${tag}-${process.pid}-${counter++}`;
    run("ip", ["netns", "add", name]);
    const ns = new NetNs(name);
    live.add(ns);
    if (!exitHook) {
      exitHook = true;
      process.on("exit", () => {
        for (const n of live) n.destroy();
      });
    }
    try {
      ns.ip("link", "set", "lo", "up");
      ns.exec(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]);
    } catch (e) {
      ns.destroy();
      throw e;
    }
    return ns;
  }

  /** `ip -n <ns> args...`; throws with ip's message on failure; returns stdout. */
  ip(...args: string[]): string {
    return run("ip", ["-n", this.name, ...args]).stdout;
  }

  /** `ip -n <ns> -j args...`, parsed. */
  ipJson<T = any>(...args: string[]): T {
    return JSON.parse(run("ip", ["-n", this.name, "-j", ...args]).stdout || "[]") as T;
  }

  /** Run argv inside the namespace (`ip netns exec`); throws unless it exits 0. */
  exec(argv: string[], opts: { input?: string; allowFail?: boolean; timeoutMs?: number } = {}): SpawnSyncReturns<string> {
    const r = spawnSync("ip", ["netns", "exec", this.name, ...argv], { encoding: "utf8", input: opts.input, timeout: opts.timeoutMs ?? 20_000 });
    if (!opts.allowFail && (r.error !== undefined || r.status !== 0)) {
      throw new Error(`ip netns exec ${this.name} ${argv.join(" ")}: ${r.error?.message ?? (r.stderr.trim() || `status ${r.status}`)}`);
    }
    return r;
  }

  /** Run fn with this thread inside the namespace. */
  enter<T>(fn: () => T): T {
    const target = sys.open(`${RUN_NETNS}/${this.name}`, sys.O_RDONLY);
    let home = -1;
    try {
      home = sys.open("/proc/thread-self/ns/net", sys.O_RDONLY);
      sys.setns(target, sys.CLONE_NEWNET);
      try {
        return fn();
      } finally {
        sys.setns(home, sys.CLONE_NEWNET);
      }
    } finally {
      sys.close(target);
      if (home >= 0) sys.close(home);
    }
  }

  /** openTap inside the namespace. */
  openTap(name: string, opts: OpenTapOptions = {}): Tap {
    return this.enter(() => openTap(name, opts));
  }

  linkExists(name: string): boolean {
    return spawnSync("ip", ["-n", this.name, "link", "show", "dev", name], { encoding: "utf8" }).status === 0;
  }

  /** `ip -s` counters of an interface: rx/tx packets and bytes (the kernel's view). */
  linkStats(name: string): { rxPackets: number; txPackets: number; rxBytes: number; txBytes: number } {
    const [l] = this.ipJson<{ stats64: { rx: { packets: number; bytes: number }; tx: { packets: number; bytes: number } } }[]>(
      "-s",
      "link",
      "show",
      "dev",
      name,
    );
    if (l === undefined) throw new Error(`no interface ${name} in ${this.name}`);
    return { rxPackets: l.stats64.rx.packets, txPackets: l.stats64.tx.packets, rxBytes: l.stats64.rx.bytes, txBytes: l.stats64.tx.bytes };
  }

  /** Delete the namespace (and the virtual interfaces in it). Idempotent. */
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    live.delete(this);
    spawnSync("ip", ["netns", "del", this.name]);
  }
}

function run(cmd: string, args: string[]): SpawnSyncReturns<string> {
  const r = spawnSync(cmd, args, { encoding: "utf8", timeout: 20_000 });
  if (r.error !== undefined) throw new Error(`${cmd} ${args.join(" ")}: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")}: ${(r.stderr || r.stdout).trim() || `status ${r.status}`}`);
  return r;
}

/** Delete namespaces this helper made in processes that are gone (a killed test run). */
function sweepStale(): void {
  let names: string[];
  try {
    names = fs.readdirSync(RUN_NETNS);
  } catch {
    return;
  }
  for (const n of names) {
    const m = /^tskvm-.+-(\d+)-\d+$/.exec(n);
    if (m === null) continue;
    const pid = Number(m[1]);
    if (pid === process.pid || pidAlive(pid)) continue;
    spawnSync("ip", ["netns", "del", n]);
  }
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

// ---- frames, for tests and the benchmark ----

export const ETH_P_IP = 0x0800;
export const ETH_P_ARP = 0x0806;

export function ipv4(text: string): Uint8Array {
  return Uint8Array.from(text.split(".").map(Number));
}

/** The Internet checksum of b[start, end). */
export function inetChecksum(b: Uint8Array, start = 0, end = b.length, initial = 0): number {
  let sum = initial;
  for (let i = start; i + 1 < end; i += 2) sum += (b[i]! << 8) | b[i + 1]!;
  if ((end - start) % 2 === 1) sum += b[end - 1]! << 8;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

/** An Ethernet ARP request or reply (42 bytes). */
export function arpFrame(op: 1 | 2, srcMac: Uint8Array, srcIp: Uint8Array, dstMac: Uint8Array, dstIp: Uint8Array): Uint8Array {
  const f = new Uint8Array(42);
  const v = new DataView(f.buffer);
  f.set(op === 1 ? new Uint8Array(6).fill(0xff) : dstMac, 0);
  f.set(srcMac, 6);
  v.setUint16(12, ETH_P_ARP);
  v.setUint16(14, 1); // Ethernet
  v.setUint16(16, ETH_P_IP);
  f[18] = 6;
  f[19] = 4;
  v.setUint16(20, op);
  f.set(srcMac, 22);
  f.set(srcIp, 28);
  f.set(op === 1 ? new Uint8Array(6) : dstMac, 32);
  f.set(dstIp, 38);
  return f;
}

/** An Ethernet + IPv4 + ICMP echo request with `payload`. */
export function icmpEcho(srcMac: Uint8Array, dstMac: Uint8Array, srcIp: Uint8Array, dstIp: Uint8Array, id: number, seq: number, payload: Uint8Array): Uint8Array {
  const f = new Uint8Array(14 + 20 + 8 + payload.length);
  const v = new DataView(f.buffer);
  f.set(dstMac, 0);
  f.set(srcMac, 6);
  v.setUint16(12, ETH_P_IP);
  f[14] = 0x45;
  v.setUint16(16, 20 + 8 + payload.length);
  v.setUint16(18, id);
  f[22] = 64; // TTL
  f[23] = 1; // ICMP
  f.set(srcIp, 26);
  f.set(dstIp, 30);
  v.setUint16(24, inetChecksum(f, 14, 34));
  f[34] = 8; // echo request
  v.setUint16(38, id);
  v.setUint16(40, seq);
  f.set(payload, 42);
  v.setUint16(36, inetChecksum(f, 34, f.length));
  return f;
}

/** An Ethernet + IPv4 + UDP frame of `size` bytes in all (at least 42), checksums filled in. */
export function udpFrame(srcMac: Uint8Array, dstMac: Uint8Array, srcIp: Uint8Array, dstIp: Uint8Array, size: number, seed = 0): Uint8Array {
  const f = new Uint8Array(Math.max(size, 42));
  const v = new DataView(f.buffer);
  f.set(dstMac, 0);
  f.set(srcMac, 6);
  v.setUint16(12, ETH_P_IP);
  f[14] = 0x45;
  v.setUint16(16, f.length - 14);
  f[22] = 64;
  f[23] = 17;
  f.set(srcIp, 26);
  f.set(dstIp, 30);
  v.setUint16(24, inetChecksum(f, 14, 34));
  v.setUint16(34, 40000);
  v.setUint16(36, 9); // discard
  v.setUint16(38, f.length - 34);
  for (let i = 42; i < f.length; i++) f[i] = (i * 7 + seed) & 0xff;
  return f;
}
