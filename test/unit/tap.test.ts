/**
 * src/host/tap.ts: the ioctl numbers against <linux/if_tun.h> (native/tun_abi.c), name
 * checks, and, as root, real TAPs in a network namespace the test creates: created vs
 * attached, gone when the fd closes (also when the process is killed), and one clear
 * error line for each way opening fails.
 */
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import * as path from "node:path";
import { TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TapError, TunAbi, configureHostSide, openTap, parseCidr, validateTapName } from "../../src/host/tap";
import * as netDevice from "../../src/devices/virtio/net/device";
import * as netHeader from "../../src/devices/virtio/net/header";
import { assertAbiMatches } from "../helpers/abi-lines";
import { NetNs, netTestSkipReason } from "../helpers/netns";

const oneLine = (e: unknown): boolean => e instanceof Error && !e.message.includes("\n");

function expectTapError(fn: () => unknown, kind: string, pattern: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof TapError, `expected a TapError, got ${String(e)}`);
    assert.equal(e.kind, kind, e.message);
    assert.match(e.message, pattern);
    assert.ok(oneLine(e), `one line: ${e.message}`);
    return true;
  });
}

describe("TUN/TAP and virtio-net ABI against the host's headers", () => {
  it("every number in TunAbi and the virtio-net constants matches native/tun_abi.c", () => {
    const ts = new Map<string, number>();
    const group = (prefix: string, obj: Record<string, number>) => {
      for (const [k, v] of Object.entries(obj)) ts.set(`${prefix}.${k}`, v);
    };
    const net = { ...netDevice, ...netHeader };
    group("TunAbi", TunAbi);
    group("VirtioNetFeature", net.VirtioNetFeature);
    group("NetConfig", net.NetConfig);
    group("NetHdr", net.NetHdr);
    group("VirtioNetGso", net.VirtioNetGso);
    ts.set("VIRTIO_NET_S_LINK_UP", net.VIRTIO_NET_S_LINK_UP);
    ts.set("VIRTIO_NET_HDR_F_NEEDS_CSUM", net.VIRTIO_NET_HDR_F_NEEDS_CSUM);
    ts.set("VIRTIO_NET_HDR_F_DATA_VALID", net.VIRTIO_NET_HDR_F_DATA_VALID);
    assertAbiMatches("tun_abi", ts);
    // The _IOW rule, spelled out once: dir 1 (write) << 30 | size 4 << 16 | 'T' << 8 | 202.
    assert.equal(TunAbi.TUNSETIFF, 0x400454ca);
  });
});

describe("TAP names and host addresses", () => {
  it("refuses names the kernel would refuse, before touching /dev/net/tun", () => {
    expectTapError(() => validateTapName("a-very-long-name0"), "NameTooLong", /at most 15 .*IFNAMSIZ 16 includes the NUL/);
    expectTapError(() => openTap("0123456789abcdef"), "NameTooLong", /"0123456789abcdef" is 16 bytes/);
    expectTapError(() => openTap(""), "InvalidName", /empty/);
    expectTapError(() => openTap("tap/0"), "InvalidName", /not a valid interface name/);
    expectTapError(() => openTap("tap 0"), "InvalidName", /not a valid interface name/);
    expectTapError(() => openTap(".."), "InvalidName", /not a valid interface name/);
    validateTapName("0123456789abcde"); // 15 bytes: fine
  });

  it("a missing /dev/net/tun says to load the module", () => {
    expectTapError(() => openTap("tap0", { devicePath: "/nonexistent/tun" }), "NoTunDevice", /\/nonexistent\/tun is missing .*modprobe tun/);
  });

  it("parses host CIDRs and refuses others", () => {
    assert.deepEqual(parseCidr("192.168.100.1/24"), { address: Uint8Array.of(192, 168, 100, 1), prefix: 24 });
    for (const bad of ["192.168.100.1", "192.168.100.256/24", "10.0.0.1/0", "10.0.0.1/31", "fe80::1/64", "a.b.c.d/8"]) {
      expectTapError(() => parseCidr(bad), "HostSetup", /not an IPv4 address with a prefix length/);
    }
  });
});

const skip = netTestSkipReason();

describe("real TAPs in a network namespace", { skip: skip ?? false }, () => {
  let ns: NetNs;
  before(() => {
    ns = NetNs.create("tap");
  });
  after(() => {
    ns?.destroy();
  });

  it("creates a TAP with IFF_VNET_HDR and no PI, which goes away with its fd", () => {
    const tap = ns.openTap("tsk0", { vnetHeaderSize: 12 });
    try {
      assert.equal(tap.name, "tsk0");
      assert.equal(tap.created, true);
      assert.equal(tap.vnetHeaderSize, 12);
      const [link] = ns.ipJson<any[]>("-d", "link", "show", "dev", "tsk0");
      assert.equal(link.linkinfo.info_kind, "tun");
      assert.equal(link.linkinfo.info_data.type, "tap");
      assert.equal(link.linkinfo.info_data.pi, false);
      assert.equal(link.linkinfo.info_data.vnet_hdr, true);
      assert.equal(link.linkinfo.info_data.persist, false);
      assert.equal(tap.read(new Uint8Array(2048)), 0, "nothing to read: EAGAIN is 0, not a throw");
      tap.setVnetHeaderSize(10);
      assert.equal(tap.vnetHeaderSize, 10);
    } finally {
      tap.close();
    }
    tap.close(); // idempotent
    assert.equal(ns.linkExists("tsk0"), false, "a TAP we created disappears when its fd closes");
  });

  it("lets the kernel pick a name from a %d pattern", () => {
    const tap = ns.openTap("tskp%d");
    try {
      assert.match(tap.name, /^tskp\d+$/);
      assert.ok(ns.linkExists(tap.name));
    } finally {
      tap.close();
    }
    assert.equal(ns.linkExists(tap.name), false);
  });

  it("a TAP created by a process that is killed goes away too", async () => {
    const tapJs = path.resolve(__dirname, "../../src/host/tap.js");
    const script = `const t = require(${JSON.stringify(tapJs)}).openTap("tskkill0"); process.stdout.write("ready " + t.created + "\\n"); setInterval(() => {}, 1e6);`;
    const child = spawn("ip", ["netns", "exec", ns.name, process.execPath, "-e", script], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stderr.on("data", (d) => (err += d));
    await new Promise<void>((resolve, reject) => {
      child.stdout.on("data", (d) => {
        out += d;
        if (out.includes("\n")) resolve();
      });
      child.on("exit", (code) => reject(new Error(`child exited ${code}: ${err}`)));
    });
    assert.equal(out.trim(), "ready true");
    assert.ok(ns.linkExists("tskkill0"));
    const exited = new Promise((resolve) => child.on("exit", resolve));
    child.kill("SIGKILL");
    await exited;
    assert.equal(ns.linkExists("tskkill0"), false, "the kernel removed the TAP when the killed process's fd closed");
  });

  it("attaches to an existing persistent TAP and leaves it in place", () => {
    ns.ip("tuntap", "add", "dev", "tskpers0", "mode", "tap");
    const tap = ns.openTap("tskpers0");
    try {
      assert.equal(tap.created, false);
      const [link] = ns.ipJson<any[]>("-d", "link", "show", "dev", "tskpers0");
      assert.equal(link.linkinfo.info_data.vnet_hdr, true, "our flags apply to the attached TAP");
    } finally {
      tap.close();
    }
    assert.ok(ns.linkExists("tskpers0"), "an attached TAP stays after close");
    ns.ip("link", "del", "tskpers0");
  });

  it("a TAP another fd holds is busy", () => {
    const first = ns.openTap("tskbusy0");
    try {
      expectTapError(() => ns.openTap("tskbusy0"), "Busy", /"tskbusy0" is busy: another process has it open/);
    } finally {
      first.close();
    }
  });

  it("an existing interface that is not a single-queue TAP gets a clear error", () => {
    ns.ip("link", "add", "tskbr0", "type", "bridge");
    expectTapError(() => ns.openTap("tskbr0"), "NotTap", /"tskbr0" exists and is not a TAP \(it is a "bridge" interface\).*ip link del tskbr0/);
    expectTapError(() => ns.openTap("lo"), "NotTap", /"lo" exists and is not a TAP \(it is not a TUN\/TAP interface\)/);
    ns.ip("tuntap", "add", "dev", "tsktun0", "mode", "tun");
    expectTapError(() => ns.openTap("tsktun0"), "NotTap", /"tsktun0" is a TUN \(layer 3\) device, not a TAP/);
    ns.ip("tuntap", "add", "dev", "tskmq0", "mode", "tap", "multi_queue");
    expectTapError(() => ns.openTap("tskmq0"), "NotTap", /"tskmq0" is multi-queue/);
    for (const l of ["tskbr0", "tsktun0", "tskmq0"]) ns.ip("link", "del", l);
  });

  it("without CAP_NET_ADMIN the error says what to do", (t) => {
    const tapJs = path.resolve(__dirname, "../../src/host/tap.js");
    const script =
      `try { require(${JSON.stringify(tapJs)}).openTap("tskperm0"); console.log("opened"); }` +
      ` catch (e) { console.log(JSON.stringify({ kind: e.kind, message: e.message })); }`;
    const r = ns.exec(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", process.execPath, "-e", script], {
      allowFail: true,
    });
    if (r.status !== 0 && r.stdout.trim() === "") {
      t.skip(`cannot run node as nobody here: ${r.stderr.trim().split("\n")[0]}`);
      return;
    }
    const res = JSON.parse(r.stdout.trim()) as { kind: string; message: string };
    assert.equal(res.kind, "NoPermission");
    assert.match(res.message, /needs CAP_NET_ADMIN: run as root or give the binary the capability/);
    assert.ok(!res.message.includes("\n"));
    assert.equal(ns.linkExists("tskperm0"), false);
  });

  it("configureHostSide gives the TAP its address and brings it up", () => {
    const tap = ns.openTap("tskhost0");
    try {
      configureHostSide("tskhost0", "192.168.100.1/24", { netns: ns.name });
      configureHostSide("tskhost0", "192.168.100.1/24", { netns: ns.name }); // again: replaced, not an error
      const [a] = ns.ipJson<any[]>("addr", "show", "dev", "tskhost0");
      assert.ok(a.flags.includes("UP"));
      const v4 = a.addr_info.filter((x: any) => x.family === "inet");
      assert.deepEqual(
        v4.map((x: any) => `${x.local}/${x.prefixlen}`),
        ["192.168.100.1/24"],
      );
    } finally {
      tap.close();
    }
    expectTapError(() => configureHostSide("tsknone0", "192.168.100.1/24", { netns: ns.name }), "HostSetup", /could not give TAP "tsknone0" the address .*: ip .*/);
  });

  it("setOffload takes what a TAP supports and refuses TSO without checksum offload", () => {
    const tap = ns.openTap("tskoff0");
    try {
      tap.setOffload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN);
      tap.setOffload(TUN_F_CSUM);
      tap.setOffload(0);
      assert.throws(() => tap.setOffload(TUN_F_TSO4), /TUNSETOFFLOAD failed: EINVAL/);
    } finally {
      tap.close();
    }
  });
});
