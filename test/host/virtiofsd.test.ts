/**
 * tskvm's vhost-user front end against the real virtiofsd, without a VM: start it the way a
 * share does, negotiate, hand it "guest RAM" (a memfd) and two virtqueues, and speak FUSE
 * through them as a guest driver would. Needs virtiofsd (Debian: qemu-system-common); says
 * so and skips without it, fails instead when TSKVM_REQUIRE_VIRTIOFSD=1 (CI).
 */
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { chownSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type RuntimeDir, createRuntimeDir } from "../../src/host/helper-process";
import { type Virtiofsd, VirtiofsdError, startVirtiofsd } from "../../src/host/virtiofsd";
import { FuseOpcode } from "../../src/devices/virtio/fs/fuse";
import { FuseClient } from "../helpers/fuse-client";
import { virtiofsdSkip } from "../helpers/tiers";

const EROFS = -30;
const ENOENT = -2;

const skip = virtiofsdSkip();

function processAlive(pid: number | undefined): boolean {
  if (pid === undefined) return false;
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  // A zombie still answers kill 0; it is gone for our purposes.
  try {
    return !/^\S+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, "utf8"));
  } catch {
    return false;
  }
}

describe("virtiofsd over tskvm's vhost-user front end", { skip }, () => {
  let work: string;
  let runtime: RuntimeDir;
  before(() => {
    work = mkdtempSync(join(tmpdir(), "tskvm-virtiofsd-test-"));
    mkdirSync(join(work, "share"));
    writeFileSync(join(work, "share", "hello.txt"), "hello from the host\n");
    runtime = createRuntimeDir("test");
  });
  after(() => {
    runtime.remove();
    rmSync(work, { recursive: true, force: true });
  });

  async function withShare(readOnly: boolean, fn: (d: Virtiofsd, c: FuseClient) => Promise<void> | void): Promise<void> {
    const d = await startVirtiofsd({ hostPath: join(work, "share"), tag: "t", readOnly }, { runtimeDir: runtime.path, index: 0 });
    const client = new FuseClient(d.frontend);
    try {
      await fn(d, client);
    } finally {
      await d.stop();
      client.close();
    }
  }

  it("negotiates, maps guest RAM and answers FUSE requests", async () => {
    await withShare(false, (d, c) => {
      assert.equal(d.backend.queueCount, 2);
      assert.deepEqual(c.init(), { major: 7, minor: 36 });
      const node = c.lookup(1n, "hello.txt");
      assert.equal(typeof node, "bigint");
      assert.equal(c.readFile(node as bigint), "hello from the host\n");
      assert.equal(c.lookup(1n, "absent"), ENOENT);
      assert.equal(c.createFile(1n, "from-guest.txt", "written through virtio-fs\n"), 0);
      assert.equal(readFileSync(join(work, "share", "from-guest.txt"), "utf8"), "written through virtio-fs\n");
    });
  });

  it("answers a batch of requests in the order they were made available", async () => {
    await withShare(false, (_d, c) => {
      c.init();
      const lookups = ["hello.txt", "absent-1", "absent-2", "hello.txt", "absent-3", "absent-4"].map((name) => ({
        opcode: FuseOpcode.LOOKUP,
        nodeid: 1n,
        body: Buffer.from(`${name}\0`),
      }));
      // What tskvm's recovery from a dead virtiofsd relies on (devices/virtio/fs/in-flight.ts).
      assert.deepEqual(c.answerOrder(lookups), [0, 1, 2, 3, 4, 5]);
    });
  });

  it("sees a file the host writes while the share is in use", async () => {
    await withShare(false, (_d, c) => {
      c.init();
      writeFileSync(join(work, "share", "late.txt"), "late\n");
      const node = c.lookup(1n, "late.txt");
      assert.equal(c.readFile(node as bigint), "late\n");
    });
  });

  it("refuses writes to a read-only share with EROFS, enforced on the host", async () => {
    await withShare(true, (_d, c) => {
      c.init();
      assert.equal(c.readFile(c.lookup(1n, "hello.txt") as bigint), "hello from the host\n");
      // A fresh name: virtiofsd 7.2 aborts on a CREATE of a name that exists (it retries the
      // open with O_CREAT and no mode; docs/virtiofs.md).
      assert.equal(c.createFile(1n, "nope.txt", "x"), EROFS);
      assert.equal(existsSync(join(work, "share", "nope.txt")), false);
    });
  });

  it("exits when tskvm's end of the connection closes, leaving nothing behind", async () => {
    const d = await startVirtiofsd({ hostPath: join(work, "share"), tag: "t", readOnly: false }, { runtimeDir: runtime.path, index: 1 });
    const pid = d.process.pid;
    assert.ok(processAlive(pid));
    d.frontend.close(); // what the kernel does when tskvm dies
    assert.equal(await d.process.waitExit(10_000), true, "virtiofsd ended by itself");
    const exit = await d.process.exited;
    assert.deepEqual([exit.code, exit.signal], [0, null]);
    assert.equal(processAlive(pid), false);
    assert.deepEqual(readdirSync(runtime.path), [], "no socket file left");
  });

  it("reports a virtiofsd killed under a running share", async () => {
    await withShare(false, async (d, c) => {
      c.init();
      process.kill(d.process.pid!, "SIGKILL");
      assert.equal(await d.process.waitExit(10_000), true);
      const exit = await d.process.exited;
      assert.equal(exit.signal, "SIGKILL");
      // Its sandboxed child follows it (PR_SET_PDEATHSIG inside virtiofsd): the connection closes.
      const deadline = Date.now() + 10_000;
      while (!d.frontend.channel.peerGone() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      assert.equal(d.frontend.channel.peerGone(), true);
    });
  });

  it("names a share directory that does not exist", async () => {
    await assert.rejects(
      startVirtiofsd({ hostPath: join(work, "missing"), tag: "t", readOnly: false }, { runtimeDir: runtime.path, index: 2 }),
      (e: unknown) => e instanceof VirtiofsdError && e.failure === "input" && /cannot share .*missing: no such directory/.test(e.message),
    );
  });

  it("explains a virtiofsd that fails to start, and leaves nothing running", async () => {
    await assert.rejects(
      startVirtiofsd({ hostPath: join(work, "share"), tag: "t", readOnly: false }, { runtimeDir: runtime.path, index: 3, binary: "/bin/false" }),
      (e: unknown) => e instanceof VirtiofsdError && e.failure === "host" && /failed to start \(exited with status 1/.test(e.message),
    );
    assert.deepEqual(readdirSync(runtime.path), []);
  });
});

const asRoot = process.getuid?.() === 0;
describe("virtiofsd for an ordinary user", { skip: skip || (asRoot ? false : "needs root to run the check as another user (nobody)") }, () => {
  const NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"];
  let dir: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), "tskvm-virtiofsd-nobody-"));
    writeFileSync(join(dir, "hello.txt"), "hello, nobody\n");
    chownRecursive(dir, 65534);
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  const usernsWorks = (): boolean =>
    spawnSync(NOBODY[0]!, [...NOBODY.slice(1), "unshare", "--user", "--map-root-user", "true"]).status === 0;
  const probe = (mode: string): Record<string, any> => {
    const r = spawnSync(NOBODY[0]!, [...NOBODY.slice(1), process.execPath, join(__dirname, "..", "helpers", "virtiofsd-probe.js"), dir, mode], {
      encoding: "utf8",
      timeout: 60_000,
      env: { ...process.env, XDG_RUNTIME_DIR: "" },
    });
    assert.equal(r.status, 0, r.stderr);
    return JSON.parse(r.stdout.trim().split("\n").at(-1)!);
  };

  it("serves the share from a user namespace, or says precisely why it cannot", () => {
    const out = probe("rw");
    assert.equal(out.uid, 65534);
    if (!usernsWorks()) {
      assert.match(out.error, /may not sandbox itself \(a user namespace\): run as root, or allow unprivileged user namespaces/);
      return;
    }
    assert.equal(out.error, undefined);
    assert.deepEqual(out.init, { major: 7, minor: 36 });
    assert.equal(out.read, "hello, nobody\n");
    assert.equal(out.create, 0);
    const created = readdirSync(dir).filter((n) => n.startsWith("created-by-65534-"));
    assert.equal(created.length, 1);
    assert.equal(statSync(join(dir, created[0]!)).uid, 65534, "the guest's files belong to the user");
  });

  it("keeps a read-only share read-only for an ordinary user too", { skip: !usernsWorks() && "no user namespaces here" }, () => {
    const out = probe("ro");
    assert.equal(out.error, undefined);
    assert.equal(out.read, "hello, nobody\n");
    assert.equal(out.create, EROFS);
  });
});

function chownRecursive(path: string, id: number): void {
  chownSync(path, id, id);
  if (statSync(path).isDirectory()) for (const n of readdirSync(path)) chownRecursive(join(path, n), id);
}
