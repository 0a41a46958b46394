/**
 * src/host/passt.ts: the forward syntax and checks, and the real passt (Debian package)
 * started in a network namespace the test makes (with an uplink and a default route, so
 * nothing leaves it), spoken to through NetStream as a fake guest: DHCP, a forwarded port
 * reaching the guest, passt ending with its socket (stop, tskvm killed) or dying on its own,
 * and each start-up failure as one line.
 */
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { NetStream } from "../../src/host/net-stream";
import {
  DEFAULT_FORWARD_ADDRESS,
  Passt,
  PasstError,
  checkForwards,
  checkHostPort,
  formatForward,
  freeLoopbackPort,
  parseForward,
  type PortForward,
} from "../../src/host/passt";
import { NetNs } from "../helpers/netns";
import { DhcpType, addUplink, dhcpFrame, dotted, parseDhcpReply, passtInNetns, passtRuntimeDirs, passtSkipReason } from "../helpers/passt";
import { waitUntil } from "../helpers/wait";

const oneLine = (e: unknown): boolean => e instanceof Error && !e.message.includes("\n");

function expectPasstError(kind: string, pattern: RegExp): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(e instanceof PasstError, `expected a PasstError, got ${String(e)}`);
    assert.equal(e.kind, kind, e.message);
    assert.match(e.message, pattern);
    assert.ok(oneLine(e), e.message);
    return true;
  };
}

describe("port forward syntax", () => {
  it("parses tcp:HOST:GUEST, udp:..., and an explicit host address", () => {
    assert.deepEqual(parseForward("tcp:2222:22"), { protocol: "tcp", hostAddress: "127.0.0.1", hostPort: 2222, guestPort: 22 });
    assert.deepEqual(parseForward("udp:5353:53"), { protocol: "udp", hostAddress: "127.0.0.1", hostPort: 5353, guestPort: 53 });
    assert.deepEqual(parseForward("tcp:0.0.0.0:8080:80"), { protocol: "tcp", hostAddress: "0.0.0.0", hostPort: 8080, guestPort: 80 });
    assert.equal(formatForward(parseForward("tcp:2222:22")), "tcp:127.0.0.1:2222:22");
  });

  it("refuses malformed forwards with one line each", () => {
    const cases: [string, RegExp][] = [
      ["", /does not start with "tcp:" or "udp:"/],
      ["sctp:1:2", /does not start with "tcp:" or "udp:"/],
      ["tcp:22", /is not protocol, host port and guest port/],
      ["tcp:1:2:3:4", /is not protocol, host port and guest port/],
      ["tcp:0:22", /host port "0", not a number from 1 to 65535/],
      ["tcp:65536:22", /host port "65536"/],
      ["tcp:2222:", /guest port "", not a number/],
      ["tcp:2222:x", /guest port "x"/],
      ["tcp:-1:22", /host port "-1"/],
      ["tcp:1e3:22", /host port "1e3"/],
      ["tcp:localhost:80:80", /has "localhost" where an IPv4 host address or nothing belongs/],
      ["TCP:80:80", /does not start with "tcp:"/],
    ];
    for (const [text, pattern] of cases) {
      assert.throws(() => parseForward(text), expectPasstError("BadForward", pattern), text);
    }
    assert.throws(() => parseForward("tcp:22"), /expected tcp:HOST_PORT:GUEST_PORT or udp:HOST_PORT:GUEST_PORT/);
  });

  it("refuses one host port forwarded twice for a protocol, and allows it for tcp and udp", () => {
    assert.throws(
      () => checkForwards([parseForward("tcp:8080:80"), parseForward("tcp:0.0.0.0:8080:81")]),
      expectPasstError("BadForward", /host port 8080 \(tcp\) is forwarded twice \(tcp:127.0.0.1:8080:80 and tcp:0.0.0.0:8080:81\)/),
    );
    checkForwards([parseForward("tcp:8080:80"), parseForward("udp:8080:80")]);
  });
});

describe("host port checks", () => {
  it("says when a host port is in use", async () => {
    const server = net.createServer();
    await new Promise<void>((r) => server.listen(0, DEFAULT_FORWARD_ADDRESS, () => r()));
    const port = (server.address() as net.AddressInfo).port;
    try {
      await assert.rejects(checkHostPort(parseForward(`tcp:${port}:22`)), expectPasstError("PortInUse", new RegExp(`host port ${port} \\(tcp on 127.0.0.1\\) is already in use`)));
    } finally {
      server.close();
    }
    // Free again, and free for UDP all along.
    await checkHostPort(parseForward(`tcp:${port}:22`));
    await checkHostPort(parseForward(`udp:${port}:22`));
    assert.ok((await freeLoopbackPort()) > 0);
  });

  it("says when a host port is privileged for this user", async (t) => {
    const asRoot = process.getuid?.() === 0;
    if (asRoot && spawnSync("setpriv", ["--version"]).status !== 0) return t.skip("root, and no setpriv to drop privileges");
    // As root, ask as "nobody" (no capabilities) in a child process.
    const mod = path.join(__dirname, "../../src/host/passt.js");
    const script = `require(${JSON.stringify(mod)}).checkHostPort({ protocol: "tcp", hostAddress: "127.0.0.1", hostPort: 80, guestPort: 80 })
      .then(() => console.log("bound"), (e) => console.log(e.kind + " " + e.message));`;
    const argv = asRoot ? ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", process.execPath, "-e", script] : [process.execPath, "-e", script];
    const r = spawnSync(argv[0]!, argv.slice(1), { encoding: "utf8" });
    const start = Number(fs.readFileSync("/proc/sys/net/ipv4/ip_unprivileged_port_start", "utf8"));
    if (start <= 80) return t.skip(`net.ipv4.ip_unprivileged_port_start is ${start}: port 80 is not privileged here`);
    assert.match(r.stdout.trim(), /^PortPrivileged host port 80 \(tcp on 127.0.0.1\) is below 1024 and binding it needs privileges .*: pick a higher host port$/, r.stderr);
  });
});

describe("passt failing at start-up (a stand-in script)", () => {
  const fake = (name: string, body: string) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "tskvm-fake-passt-"));
    process.on("exit", () => fs.rmSync(dir, { recursive: true, force: true }));
    const file = path.join(dir, name);
    fs.writeFileSync(file, `#!/bin/sh\n${body}\n`, { mode: 0o755 });
    return file;
  };

  it("no user namespace for its sandbox (a chroot): says so", async () => {
    const command = fake("passt", `echo "No external routable interface for IPv6" >&2; echo "Couldn't create user namespace: Operation not permitted" >&2; exit 1`);
    await assert.rejects(Passt.start({ command, sshForward: false }), expectPasstError("Failed", /^passt cannot sandbox itself: creating a user namespace is not permitted here/));
  });

  it("anything else: its exit status and its last line", async () => {
    const command = fake("passt", `echo "Syslog chatter" >&2; echo "Failed to send 47 bytes to syslog" >&2; echo "Weird option" >&2; exit 3`);
    await assert.rejects(Passt.start({ command, sshForward: false }), expectPasstError("Failed", /^passt exited with status 3 at start-up: Weird option$/));
  });
});

describe("passt not installed", () => {
  it("names the package to install", async () => {
    await assert.rejects(
      Passt.start({ command: "tskvm-no-such-passt" }),
      expectPasstError("NotInstalled", /user-mode networking needs passt, which is not installed: install the package "passt" \(e.g. apt-get install passt\)/),
    );
  });
});

function listening(ns: NetNs, port: number): boolean {
  const r = ns.exec(["ss", "-Htln", `sport = :${port}`]);
  return r.stdout.trim() !== "";
}


/** The next frame from passt that `match` accepts (others are skipped), within the deadline. */
async function nextFrame<T>(s: NetStream, fd: number, match: (f: Uint8Array) => T | undefined, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    for (let f = s.peekFrame(); f !== undefined; f = s.peekFrame()) {
      const m = match(f);
      s.consumeFrame();
      if (m !== undefined) return m;
    }
    if (s.down !== undefined) throw new Error(`stream down: ${s.down}`);
    if (Date.now() > deadline) throw new Error("timed out waiting for a frame from passt");
    await new Promise((r) => setTimeout(r, 5));
    void fd;
  }
}

/** A TCP SYN in an Ethernet frame: its destination port; undefined for anything else. */
function tcpSynPort(f: Uint8Array): number | undefined {
  const v = new DataView(f.buffer, f.byteOffset, f.byteLength);
  if (f.length < 54 || v.getUint16(12) !== 0x0800 || f[23] !== 6) return undefined;
  const tcp = 14 + (f[14]! & 0xf) * 4;
  const flags = f[tcp + 13]!;
  return (flags & 0x12) === 0x02 ? v.getUint16(tcp + 2) : undefined;
}

/** Connect to 127.0.0.1:port from inside the namespace (a child node process); resolves once connected. */
function connectInNetns(ns: NetNs, port: number): { done: Promise<void>; kill: () => void } {
  const child = spawn("ip", ["netns", "exec", ns.name, process.execPath, "-e", `require("net").connect(${port}, "127.0.0.1", () => console.log("connected")); setTimeout(() => {}, 60000);`], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  const done = new Promise<void>((resolve, reject) => {
    child.stdout!.on("data", (d: Buffer) => d.toString().includes("connected") && resolve());
    child.on("exit", (code) => reject(new Error(`the client exited (${code}) before connecting`)));
  });
  return { done, kill: () => child.kill("SIGKILL") };
}

const skip = passtSkipReason();

describe("the real passt, in a namespace with an uplink", { skip }, () => {
  let ns: NetNs;
  let command: string;
  const guestMac = Uint8Array.of(0x52, 0x54, 0x00, 0x12, 0x34, 0x56);

  before(() => {
    ns = NetNs.create("passt");
    addUplink(ns, "10.0.2.15", 24, "10.0.2.2");
    command = passtInNetns(ns);
  });
  after(() => ns?.destroy());

  it("gives the guest its address by DHCP (the uplink's, the gateway, MTU 65520)", async () => {
    const p = await Passt.start({ command, sshForward: false });
    try {
      const s = new NetStream(p.fd);
      assert.ok(s.sendFrame(dhcpFrame(guestMac, DhcpType.DISCOVER, 0x1234)));
      const offer = await nextFrame(s, p.fd, (f) => parseDhcpReply(f));
      assert.equal(offer.type, DhcpType.OFFER);
      assert.equal(offer.xid, 0x1234);
      assert.equal(offer.yiaddr, "10.0.2.15");
      assert.equal(dotted(offer.options.get(3)), "10.0.2.2", "router");
      assert.equal(dotted(offer.options.get(1)), "255.255.255.0", "netmask");
      assert.equal(new DataView(offer.options.get(26)!.buffer).getUint16(0), 65520, "MTU");
      assert.ok(s.sendFrame(dhcpFrame(guestMac, DhcpType.REQUEST, 0x1235, offer.yiaddr, dotted(offer.options.get(54)))));
      const ack = await nextFrame(s, p.fd, (f) => parseDhcpReply(f));
      assert.equal(ack.type, DhcpType.ACK);
      assert.equal(ack.yiaddr, "10.0.2.15");
    } finally {
      await p.stop();
    }
  });

  it("forwards host ports (the user's and a free one for SSH) to the guest, and frees them on stop", async () => {
    const hostPort = 20000 + (process.pid % 20000);
    const fwd: PortForward = parseForward(`tcp:${hostPort}:8080`);
    const p = await Passt.start({ command, forwards: [fwd] });
    const s = new NetStream(p.fd);
    const clients: { kill: () => void }[] = [];
    try {
      assert.ok(p.sshPort !== undefined && p.sshPort !== hostPort);
      assert.deepEqual(p.forwards.map(formatForward), [`tcp:127.0.0.1:${hostPort}:8080`, `tcp:127.0.0.1:${p.sshPort}:22`]);
      assert.ok(listening(ns, hostPort));
      assert.ok(listening(ns, p.sshPort));
      // The guest has to have spoken first, for passt to know its MAC and address.
      assert.ok(s.sendFrame(dhcpFrame(guestMac, DhcpType.DISCOVER, 1)));
      await nextFrame(s, p.fd, (f) => parseDhcpReply(f));
      for (const [port, guestPort] of [
        [hostPort, 8080],
        [p.sshPort, 22],
      ] as const) {
        const c = connectInNetns(ns, port);
        clients.push(c);
        await c.done;
        assert.equal(await nextFrame(s, p.fd, tcpSynPort), guestPort);
      }
    } finally {
      for (const c of clients) c.kill();
      await p.stop();
    }
    const e = await p.exited;
    assert.deepEqual(e, { code: 0, signal: null, expected: true }, "passt quits by itself when its socket closes");
    assert.equal(listening(ns, hostPort), false);
    assert.deepEqual(passtRuntimeDirs(process.pid), []);
  });

  it("is gone with its ports when the tskvm process is SIGKILLed", async () => {
    const mod = path.join(__dirname, "../../src/host/passt.js");
    const script = `require(${JSON.stringify(mod)}).Passt.start().then((p) => { console.log(JSON.stringify({ pid: p.pid, ssh: p.sshPort })); setInterval(() => {}, 1000); },
      (e) => { console.log(JSON.stringify({ error: e.message })); });`;
    const child = spawn("ip", ["netns", "exec", ns.name, process.execPath, "-e", script], { stdio: ["ignore", "pipe", "inherit"] });
    const info = await new Promise<{ pid: number; ssh: number; error?: string }>((resolve, reject) => {
      let out = "";
      child.stdout!.on("data", (d: Buffer) => {
        out += d.toString();
        if (out.includes("\n")) resolve(JSON.parse(out.split("\n")[0]!));
      });
      child.on("exit", () => reject(new Error(`ended before printing: ${out}`)));
    });
    assert.equal(info.error, undefined);
    assert.ok(listening(ns, info.ssh));
    child.kill("SIGKILL");
    await waitUntil(() => !running(info.pid), 10_000, "passt to end");
    await waitUntil(() => !listening(ns, info.ssh), 10_000, "its port to close");
    assert.deepEqual(passtRuntimeDirs(child.pid!), [], "the runtime directory was gone before the kill");
  });

  it("works for a user without privileges (nobody, no capabilities): DHCP, a forward, stop", async (t) => {
    if (spawnSync("setpriv", ["--version"]).status !== 0) return t.skip("needs setpriv (util-linux) to drop privileges");
    const dir = path.join(__dirname, "../..");
    const script = `
      const { Passt, parseForward } = require(${JSON.stringify(path.join(dir, "src/host/passt.js"))});
      const { NetStream } = require(${JSON.stringify(path.join(dir, "src/host/net-stream.js"))});
      const h = require(${JSON.stringify(path.join(dir, "test/helpers/passt.js"))});
      (async () => {
        const p = await Passt.start({ forwards: [parseForward("tcp:${21000 + (process.pid % 20000)}:80")] });
        const uid = require("fs").readFileSync("/proc/" + p.pid + "/status", "utf8").match(/Uid:\\s+(\\d+)/)[1];
        const s = new NetStream(p.fd);
        s.sendFrame(h.dhcpFrame(Uint8Array.of(0x52, 0x54, 0, 1, 2, 3), h.DhcpType.DISCOVER, 7));
        let reply;
        for (let i = 0; i < 500 && reply === undefined; i++) {
          const f = s.peekFrame();
          if (f === undefined) { await new Promise((r) => setTimeout(r, 10)); continue; }
          reply = h.parseDhcpReply(f);
          s.consumeFrame();
        }
        await p.stop();
        console.log(JSON.stringify({ uid, yiaddr: reply && reply.yiaddr, ssh: p.sshPort, exit: await p.exited }));
      })().catch((e) => console.log(JSON.stringify({ error: e.message })));`;
    const r = spawnSync(
      "ip",
      ["netns", "exec", ns.name, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", process.execPath, "-e", script],
      { encoding: "utf8", timeout: 60_000 },
    );
    const out = JSON.parse(r.stdout.trim().split("\n").pop() || "{}");
    assert.equal(out.error, undefined, r.stderr);
    assert.equal(out.uid, "65534");
    assert.equal(out.yiaddr, "10.0.2.15");
    assert.ok(out.ssh > 0);
    assert.deepEqual(out.exit, { code: 0, signal: null, expected: true });
  });

  it("when passt dies, the stream goes down and the exit is unexpected", async () => {
    const p = await Passt.start({ command, sshForward: false });
    const s = new NetStream(p.fd);
    process.kill(p.pid, "SIGKILL");
    const keepAlive = setInterval(() => {}, 1000);
    const e = await p.exited;
    clearInterval(keepAlive);
    assert.deepEqual(e, { code: null, signal: "SIGKILL", expected: false });
    assert.equal(s.peekFrame(), undefined);
    assert.equal(s.down, "the peer closed the connection");
    await p.stop();
  });

  it("says when passt cannot listen on a forwarded port", async () => {
    // Taken inside the namespace only, so our own check (in this namespace) passes and passt's fails.
    const port = 30000 + (process.pid % 20000);
    const holder = spawn("ip", ["netns", "exec", ns.name, process.execPath, "-e", `require("net").createServer().listen(${port}, "127.0.0.1", () => console.log("up"))`], {
      stdio: ["ignore", "pipe", "inherit"],
    });
    try {
      await new Promise<void>((resolve) => holder.stdout!.on("data", () => resolve()));
      await assert.rejects(
        Passt.start({ command, forwards: [parseForward(`tcp:${port}:80`)], sshForward: false }),
        expectPasstError("PortInUse", new RegExp(`passt could not listen on host port ${port} \\(tcp on 127.0.0.1, forward tcp:127.0.0.1:${port}:80\\): it is in use`)),
      );
    } finally {
      holder.kill("SIGKILL");
    }
    assert.deepEqual(passtRuntimeDirs(process.pid), []);
  });

  it("says when the host has no default route", async () => {
    const bare = NetNs.create("passt-bare");
    try {
      await assert.rejects(
        Passt.start({ command: passtInNetns(bare), sshForward: false }),
        expectPasstError("NoRoute", /passt found no host network interface with a default route .*: add a default route, e.g. on a dummy interface/),
      );
    } finally {
      bare.destroy();
    }
    assert.deepEqual(passtRuntimeDirs(process.pid), []);
  });
});

function running(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z /.test(fs.readFileSync(`/proc/${pid}/stat`, "utf8"));
  } catch {
    return false;
  }
}
