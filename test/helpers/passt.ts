/**
 * For tests of user-mode networking: whether passt can run here, a network namespace with
 * the "uplink" passt needs (an interface with an address and a default route, all inside
 * the namespace: nothing leaves it), passt started inside such a namespace, and DHCP
 * frames as a guest sends and receives them.
 */
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { findExecutable } from "../../src/host/helper-process";
import { type NetNs, ETH_P_IP, inetChecksum, ipv4, netTestSkipReason } from "./netns";

/**
 * Why tests with the real passt cannot run here (undefined: they can). With
 * TSKVM_REQUIRE_PASST=1 (CI) a missing passt is an error, not a reason to skip.
 */
export function passtSkipReason(opts: { needNetns?: boolean } = {}): string | undefined {
  const why = passtMissing();
  if (why !== undefined) {
    if (process.env["TSKVM_REQUIRE_PASST"] === "1") throw new Error(`TSKVM_REQUIRE_PASST=1 but ${why}`);
    return why;
  }
  return opts.needNetns === false ? undefined : netTestSkipReason();
}

let userNamespaces: string | undefined;

/** Why passt cannot run here: not installed, or no user namespaces for its sandbox. */
function passtMissing(): string | undefined {
  if (findExecutable("passt") === undefined) return 'passt is not installed (Debian package "passt")';
  // passt sandboxes itself in a new user namespace; a plain chroot (some CI containers,
  // a VM harness that chroots) refuses that, even to root.
  userNamespaces ??= (() => {
    const r = spawnSync("unshare", ["--user", "true"], { encoding: "utf8" });
    if (r.error !== undefined) return ""; // no unshare(1) to ask: let passt say
    return r.status === 0 ? "" : `passt cannot sandbox itself here: no user namespaces (unshare --user: ${r.stderr.trim() || `status ${r.status}`})`;
  })();
  return userNamespaces === "" ? undefined : userNamespaces;
}

export interface Uplink {
  /** The interface passt copies the guest's addressing from. */
  name: string;
  /** "dummy", or "veth" where the kernel has no dummy interfaces. */
  kind: "dummy" | "veth";
  address: string;
  prefix: number;
  gateway: string;
}

/**
 * Give the namespace an interface with `address/prefix` and a default route via
 * `gateway`: a dummy interface, or a veth pair (both ends inside) where dummy is missing.
 */
export function addUplink(ns: NetNs, address = "10.0.2.15", prefix = 24, gateway = "10.0.2.2"): Uplink {
  const name = "uplink0";
  let kind: Uplink["kind"] = "dummy";
  try {
    ns.ip("link", "add", name, "type", "dummy");
  } catch {
    kind = "veth";
    ns.ip("link", "add", name, "type", "veth", "peer", "name", "uplink0p");
    ns.ip("link", "set", "uplink0p", "up");
  }
  ns.ip("addr", "add", `${address}/${prefix}`, "dev", name);
  ns.ip("link", "set", name, "up");
  ns.ip("route", "add", "default", "via", gateway, "dev", name);
  return { name, kind, address, prefix, gateway };
}

/** An executable that runs passt inside `ns` with the arguments it gets (for Passt.start's `command`). */
export function passtInNetns(ns: NetNs): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "tskvm-passt-wrapper-"));
  const file = path.join(dir, "passt");
  fs.writeFileSync(file, `#!/bin/sh\nexec ip netns exec ${ns.name} passt "$@"\n`, { mode: 0o755 });
  process.on("exit", () => fs.rmSync(dir, { recursive: true, force: true }));
  return file;
}

// ---- DHCP (RFC 2131) as the guest speaks it ----

export const DhcpType = { DISCOVER: 1, OFFER: 2, REQUEST: 3, ACK: 5 } as const;

/** A DHCP DISCOVER or REQUEST from `mac`, broadcast, as an Ethernet frame. */
export function dhcpFrame(mac: Uint8Array, type: number, xid: number, requested?: string, server?: string): Uint8Array {
  const opts: number[] = [0x63, 0x82, 0x53, 0x63, 53, 1, type];
  if (requested !== undefined) opts.push(50, 4, ...ipv4(requested));
  if (server !== undefined) opts.push(54, 4, ...ipv4(server));
  opts.push(55, 4, 1, 3, 6, 26, 255);
  const bootp = new Uint8Array(236 + opts.length);
  const bv = new DataView(bootp.buffer);
  bootp[0] = 1; // BOOTREQUEST
  bootp[1] = 1; // Ethernet
  bootp[2] = 6;
  bv.setUint32(4, xid);
  bv.setUint16(10, 0x8000); // broadcast reply
  bootp.set(mac, 28);
  bootp.set(opts, 236);
  const f = new Uint8Array(14 + 20 + 8 + bootp.length);
  const v = new DataView(f.buffer);
  f.fill(0xff, 0, 6);
  f.set(mac, 6);
  v.setUint16(12, ETH_P_IP);
  f[14] = 0x45;
  v.setUint16(16, 20 + 8 + bootp.length);
  f[22] = 64;
  f[23] = 17; // UDP
  f.fill(0xff, 30, 34); // 0.0.0.0 -> 255.255.255.255
  v.setUint16(24, inetChecksum(f, 14, 34));
  v.setUint16(34, 68);
  v.setUint16(36, 67);
  v.setUint16(38, 8 + bootp.length);
  f.set(bootp, 42);
  return f;
}

export interface DhcpReply {
  type: number;
  xid: number;
  yiaddr: string;
  /** option number -> bytes */
  options: Map<number, Uint8Array>;
  srcMac: Uint8Array;
}

/** A DHCP reply (UDP 67 -> 68) in an Ethernet frame, or undefined for any other frame. */
export function parseDhcpReply(f: Uint8Array): DhcpReply | undefined {
  const v = new DataView(f.buffer, f.byteOffset, f.byteLength);
  if (f.length < 42 + 240 || v.getUint16(12) !== ETH_P_IP || f[23] !== 17) return undefined;
  const ihl = (f[14]! & 0xf) * 4;
  const udp = 14 + ihl;
  if (v.getUint16(udp) !== 67 || v.getUint16(udp + 2) !== 68) return undefined;
  const b = udp + 8;
  const options = new Map<number, Uint8Array>();
  for (let i = b + 240; i < f.length && f[i] !== 255; ) {
    if (f[i] === 0) {
      i++;
      continue;
    }
    const len = f[i + 1]!;
    options.set(f[i]!, f.slice(i + 2, i + 2 + len));
    i += 2 + len;
  }
  const type = options.get(53)?.[0] ?? 0;
  return { type, xid: v.getUint32(b + 4), yiaddr: Array.from(f.subarray(b + 16, b + 20)).join("."), options, srcMac: f.slice(6, 12) };
}

/** "a.b.c.d" from 4 bytes. */
export function dotted(b: Uint8Array | undefined): string {
  return b === undefined ? "" : Array.from(b).join(".");
}

// ---- finding the passt a test started ----

/** An environment variable that marks every process a test starts (passt inherits it from tskvm). */
export function testMark(): { name: string; value: string; env: Record<string, string> } {
  const value = `${process.pid}-${Date.now()}-${Math.random().toString(36).slice(2)}`;
  return { name: "TSKVM_TEST_MARK", value, env: { TSKVM_TEST_MARK: value } };
}

/** Running (not zombie) passt processes whose environment carries `mark`. */
export function passtProcesses(mark: string): number[] {
  const want = `TSKVM_TEST_MARK=${mark}`;
  const pids: number[] = [];
  for (const d of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    try {
      if (!fs.readFileSync(`/proc/${d}/comm`, "utf8").startsWith("passt")) continue;
      if (/^\d+ \(.*\) Z /.test(fs.readFileSync(`/proc/${d}/stat`, "utf8"))) continue;
      if (fs.readFileSync(`/proc/${d}/environ`, "latin1").split("\0").includes(want)) pids.push(Number(d));
    } catch {
      // gone, or not ours to read
    }
  }
  return pids;
}

/** Runtime directories of passt for tskvm process `pid` (none should outlive start-up). */
export function passtRuntimeDirs(pid: number): string[] {
  const bases = [os.tmpdir(), process.env["XDG_RUNTIME_DIR"] ?? ""].filter((b) => b !== "");
  return bases.flatMap((b) => {
    try {
      return fs.readdirSync(b).filter((n) => n.startsWith(`tskvm-${pid}-passt-`));
    } catch {
      return [];
    }
  });
}
