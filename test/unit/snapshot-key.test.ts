/**
 * The `tskvm run --snapshot` key: the same boot options give the same key; anything that
 * would boot a different machine gives another.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { snapshotKey, type SnapshotKeyInput } from "../../src/api/snapshot-key";
import { deviceKey } from "../../src/api/snapshot-cache";
import { checkOptions } from "../../src/api/start";

function withFiles(fn: (kernel: string, initrd: string) => void): void {
  const dir = fs.mkdtempSync(join(tmpdir(), "tskvm-snapkey-"));
  try {
    fs.writeFileSync(join(dir, "kernel"), "kernel");
    fs.writeFileSync(join(dir, "initrd"), "initrd");
    fn(join(dir, "kernel"), join(dir, "initrd"));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

function input(kernel: string, initrd: string): SnapshotKeyInput {
  return {
    tskvmVersion: "1.0.0",
    host: { kvmKind: "hardware-intel", cpu: 0x906ea },
    kernel,
    initrd,
    cmdline: "console=ttyS0",
    memoryBytes: 256 << 20,
    cpus: 1,
    cpuTemplate: undefined,
    hideCpuFeatures: [],
    entry: undefined,
    agent: true,
    rng: true,
    disks: [{ readOnly: false }],
    nics: [],
  };
}

test("the same options give the same key, whatever the property order", () => {
  withFiles((k, i) => {
    const a = snapshotKey(input(k, i));
    assert.match(a, /^[0-9a-f]{20}$/);
    const reordered = Object.fromEntries(Object.entries(input(k, i)).reverse()) as unknown as SnapshotKeyInput;
    assert.equal(snapshotKey(reordered), a);
  });
});

test("each option that shapes the machine changes the key", () => {
  withFiles((k, i) => {
    const base = snapshotKey(input(k, i));
    const changes: [string, Partial<SnapshotKeyInput>][] = [
      ["tskvm version", { tskvmVersion: "1.0.1" }],
      ["host", { host: { kvmKind: "emulated-pvm", cpu: 0x906ea } }],
      ["command line", { cmdline: "console=ttyS0 quiet" }],
      ["memory", { memoryBytes: 512 << 20 }],
      ["vCPUs", { cpus: 2 }],
      ["CPU template", { cpuTemplate: "emulated" }],
      ["hidden features", { hideCpuFeatures: ["avx2"] }],
      ["entry", { entry: "linux64" }],
      ["agent", { agent: false }],
      ["rng", { rng: false }],
      ["disk count", { disks: [{ readOnly: false }, { readOnly: false }] }],
      ["disk read-only", { disks: [{ readOnly: true }] }],
      ["disk serial", { disks: [{ readOnly: false, serial: "x" }] }],
      ["NICs", { nics: [{ kind: "tap", tap: "tap0" }] }],
      ["initrd", { initrd: undefined }],
      ["other devices", { other: { shares: [{ tag: "src" }] } }],
    ];
    for (const [what, change] of changes) {
      assert.notEqual(snapshotKey({ ...input(k, i), ...change }), base, what);
    }
  });
});

test("a rebuilt kernel or initrd (same path) changes the key; touching nothing does not", () => {
  withFiles((k, i) => {
    const base = snapshotKey(input(k, i));
    assert.equal(snapshotKey(input(k, i)), base);
    fs.utimesSync(k, new Date(), new Date(Date.now() + 5000));
    const afterKernel = snapshotKey(input(k, i));
    assert.notEqual(afterKernel, base);
    fs.writeFileSync(i, "initrd, rebuilt");
    assert.notEqual(snapshotKey(input(k, i)), afterKernel);
  });
});

test("a missing kernel fails like any unreadable input", () => {
  withFiles((k, i) => {
    assert.throws(() => snapshotKey(input(k + ".nope", i)), /ENOENT/);
  });
});

test("shares and user-mode networking in the key: tags, mount paths, read-only flags and forwards count; a share's contents do not", () => {
  withFiles((k, i) => {
    const share = fs.mkdtempSync(join(tmpdir(), "tskvm-snapkey-share-"));
    try {
      const key = (o: Parameters<typeof checkOptions>[0]) => snapshotKey({ ...input(k, i), ...deviceKey(checkOptions({ ...o, mountShares: false })) });
      const base = key({ shares: [share] });
      assert.equal(key({ shares: [share] }), base);
      fs.writeFileSync(join(share, "new-file"), "per-run contents");
      assert.equal(key({ shares: [share] }), base, "what the share holds is not part of the key");
      assert.notEqual(key({ shares: [`${share},tag=other`] }), base, "tag");
      assert.notEqual(key({ shares: [`${share},readonly`] }), base, "read-only flag");
      assert.notEqual(key({ shares: [tmpdir()] }), base, "mount path");
      assert.notEqual(key({}), base, "no share");
      // Without shares the key is what it was before shares could be kept.
      assert.equal(key({}), snapshotKey({ ...input(k, i), disks: [], nics: [] }));
      const user = key({ net: "user" });
      assert.notEqual(user, key({}), "net user");
      assert.notEqual(key({ net: "user", forwards: ["tcp:127.0.0.1:8080:80"] }), user, "forwards");
      assert.notEqual(key({ net: "user", sshForward: false }), user, "the automatic SSH forward");
    } finally {
      fs.rmSync(share, { recursive: true, force: true });
    }
  });
});
