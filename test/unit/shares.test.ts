import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import {
  ROOTFS_TAG,
  ShareOptionError,
  encodeGuestPath,
  guestDirectoryFor,
  rootfsHostHides,
  resolveShares,
  shareKernelArgs,
  parseShareOption,
  shareMountCommand,
} from "../../src/api/shares";

const bad = (fn: () => unknown, message: RegExp) =>
  assert.throws(fn, (e: unknown) => e instanceof ShareOptionError && message.test(e.message) && !e.message.includes("\n"));

describe("shares: options", () => {
  it("makes paths absolute and tags from directory names, unique", () => {
    const s = resolveShares([{ path: "src" }, { path: "/other/src", readOnly: true }, { path: "/x/My Dir!" }, { path: "/y", tag: "src-2" }], { cwd: "/home/me" });
    assert.deepEqual(s, [
      { hostPath: "/home/me/src", tag: "src", readOnly: false },
      { hostPath: "/other/src", tag: "src-3", readOnly: true },
      { hostPath: "/x/My Dir!", tag: "My_Dir_", readOnly: false },
      { hostPath: "/y", tag: "src-2", readOnly: false },
    ]);
    assert.equal(resolveShares([{ path: "." }], { cwd: "/work/tree" })[0]!.hostPath, "/work/tree");
    assert.equal(resolveShares([{ path: `/d/${"n".repeat(80)}` }])[0]!.tag.length, 32);
  });

  it("refuses bad tags, clashes, a directory twice, and the guest's own directories", () => {
    bad(() => resolveShares([{ path: "/a", tag: "has space" }]), /share tag "has space": use 1 to 36/);
    bad(() => resolveShares([{ path: "/a", tag: "x".repeat(37) }]), /use 1 to 36/);
    bad(() => resolveShares([{ path: "/a", tag: "t" }, { path: "/b", tag: "t" }]), /share tag "t" is used twice \(\/a and \/b\)/);
    bad(() => resolveShares([{ path: "/a", tag: ROOTFS_TAG }], { rootfsHost: true }), /used twice \(the host's root file system/);
    bad(() => resolveShares([{ path: "/a" }, { path: "/a/" }]), /\/a is shared twice/);
    bad(() => resolveShares([{ path: "/" }]), /cannot share \/ .*use --rootfs host/);
    bad(() => resolveShares([{ path: "/proc/self" }]), /the guest needs its own \/proc/);
    bad(() => resolveShares([{ path: "/dev" }]), /own \/dev/);
    assert.equal(resolveShares([{ path: "/device" }])[0]!.tag, "device", "only /dev itself and below");
  });
});

describe("shares: what the default guest's /init reads", () => {
  it("encodes paths so that printf %b gives them back, byte for byte", () => {
    for (const path of ["/plain/path-1.2_x+y", "/a b/c,d", "/tab\there", "/quote'\"\\back", "/ünïcode/日本", "/glob*?[x]", "/dollar$HOME"]) {
      const enc = encodeGuestPath(path);
      assert.match(enc, /^[A-Za-z0-9/._+\\-]+$/, "one word, nothing special to the kernel or the shell");
      const r = spawnSync("busybox", ["sh", "-c", 'printf %b "$1"', "sh", enc], { encoding: "buffer" });
      if (r.error !== undefined) return; // no busybox here: the encoding is still checked above
      assert.equal(r.stdout.toString("utf8"), path);
    }
  });

  it("one kernel argument per share, the root file system first", () => {
    const shares = resolveShares([{ path: "/work/my tree" }, { path: "/data", readOnly: true, tag: "d" }]);
    assert.deepEqual(shareKernelArgs(shares), ["tskvm.share=my_tree,rw,/work/my\\0040tree", "tskvm.share=d,ro,/data"]);
    assert.deepEqual(shareKernelArgs([], true), [`tskvm.rootfs=${ROOTFS_TAG}`]);
  });

  it("mount command for the agent, and where a command runs", () => {
    const [s] = resolveShares([{ path: "/w/it's", tag: "w", readOnly: true }]);
    assert.equal(shareMountCommand(s!), `mkdir -p -- '/w/it'\\''s' && mount -t virtiofs -o ro w '/w/it'\\''s'`);
    const shares = resolveShares([{ path: "/home/me/tree" }]);
    assert.equal(guestDirectoryFor("/home/me/tree", shares), "/home/me/tree");
    assert.equal(guestDirectoryFor("/home/me/tree/sub", shares), "/home/me/tree/sub");
    assert.equal(guestDirectoryFor("/home/me/tree2", shares), undefined);
    assert.equal(guestDirectoryFor("/home/me", shares), undefined);
  });
});

describe("shares: as text", () => {
  it("parses DIR[,tag=NAME][,readonly]", () => {
    assert.deepEqual(parseShareOption("."), { path: "." });
    assert.deepEqual(parseShareOption("/a,tag=src,readonly"), { path: "/a", tag: "src", readOnly: true });
    assert.deepEqual(parseShareOption("/a,ro=off"), { path: "/a", readOnly: false });
    bad(() => parseShareOption(",tag=x"), /has no directory/);
    bad(() => parseShareOption("/a,rw"), /unknown share option "rw" in "\/a,rw" \(known: tag=NAME, readonly\)/);
    bad(() => parseShareOption("/a,readonly=maybe"), /readonly takes on or off/);
  });
});

describe("--rootfs host", () => it("the guest's own /tmp, /run, /proc, /sys, /dev hide the host's directories there, nothing else", () => {
  assert.equal(rootfsHostHides("/tmp/ci/checkout"), "/tmp");
  assert.equal(rootfsHostHides("/tmp"), "/tmp");
  assert.equal(rootfsHostHides("/run/user/1000"), "/run");
  assert.equal(rootfsHostHides("/proc/self"), "/proc");
  assert.equal(rootfsHostHides("/tmpfoo/x"), undefined);
  assert.equal(rootfsHostHides("/home/me/tree"), undefined);
  assert.equal(rootfsHostHides("/"), undefined);
  assert.equal(rootfsHostHides("/work/runner/tmp"), undefined);
}));
