/**
 * The snapshot directory format: written atomically, read back exactly, and every kind of
 * bad snapshot (truncated, corrupted, foreign, another version, another host) refused with
 * one line naming what is wrong.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import {
  RAM_FILE,
  STATE_FILE,
  SnapshotError,
  readSnapshotDir,
  writeSnapshotDir,
  type HostFacts,
  type SnapshotBody,
  type SnapshotErrorKind,
} from "../../src/vmm/snapshot/format";
import { checkHostFacts, missingFeatures } from "../../src/vmm/snapshot/host-facts";
import { VCPU_STATE_SIZES, type VcpuState } from "../../src/kvm/vcpu-state";
import { VM_STATE_SIZES, type VmState } from "../../src/kvm/vm-state";
import type { CpuidEntry } from "../../src/kvm/cpuid";
import { GuestMemory } from "../../src/memory/guest-memory";
import { writeRamFile } from "../../src/memory/ram-file";

const VERSION = "1.2.3";
const MiB = 1024 * 1024;

function withDir(fn: (dir: string) => void): void {
  const dir = fs.mkdtempSync(join(tmpdir(), "tskvm-snapfmt-"));
  try {
    fn(dir);
  } finally {
    // The snapshot's files are read-only; the directories are not.
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

const cpuid = (extra: Partial<CpuidEntry>[] = []): CpuidEntry[] => [
  { function: 0, index: 0, flags: 0, eax: 0xd, ebx: 0x756e6547, ecx: 0x6c65746e, edx: 0x49656e69 },
  { function: 1, index: 0, flags: 0, eax: 0x906ea, ebx: 0, ecx: (0x8000_0001 | (1 << 28)) >>> 0, edx: 0x1 },
  { function: 7, index: 0, flags: 1, eax: 0, ebx: (1 << 5) | (1 << 16), ecx: 0, edx: 0 },
  ...extra.map((e) => ({ function: 0, index: 0, flags: 0, eax: 0, ebx: 0, ecx: 0, edx: 0, ...e })),
];

function vcpuState(): VcpuState {
  const blob = (n: number) => new Uint8Array(randomBytes(n));
  return {
    mpState: 0,
    regs: blob(VCPU_STATE_SIZES.regs),
    sregs: blob(VCPU_STATE_SIZES.sregs),
    xsave: blob(VCPU_STATE_SIZES.xsave),
    xcrs: blob(VCPU_STATE_SIZES.xcrs),
    debugRegs: blob(VCPU_STATE_SIZES.debugRegs),
    lapic: blob(VCPU_STATE_SIZES.lapic),
    events: blob(VCPU_STATE_SIZES.events),
    msrs: [
      { index: 0x10, data: 0xffff_ffff_ffff_fff0n },
      { index: 0x4b564d01, data: 0x12345n },
    ],
    tscKhz: 2_596_128,
    cpuid: cpuid(),
  };
}

function vmState(): VmState {
  const blob = (n: number, chip?: number) => {
    const b = new Uint8Array(randomBytes(n));
    if (chip !== undefined) new DataView(b.buffer).setUint32(0, chip, true);
    return b;
  };
  return {
    pit: blob(VM_STATE_SIZES.pit),
    picMaster: blob(VM_STATE_SIZES.picMaster, 0),
    picSlave: blob(VM_STATE_SIZES.picSlave, 1),
    ioapic: blob(VM_STATE_SIZES.ioapic, 2),
    clock: { clock: 123_456_789_012n, flags: 0, hostRealtimeNs: 1_796_632_520_530_628_096n },
  };
}

function hostFacts(): HostFacts {
  return {
    kvmKind: "hardware-intel",
    apiVersion: 12,
    caps: { XSAVE: 1, XCRS: 1, VCPU_EVENTS: 1, XSAVE2: 4096 },
    cpuVendor: "GenuineIntel",
    cpuSignature: 0x906ea,
    supportedCpuid: cpuid(),
    msrIndexList: [0x10, 0x4b564d01, 0x4b564d00],
    tscKhz: 2_596_128,
  };
}

function body(): Omit<SnapshotBody, "ram"> {
  return {
    host: hostFacts(),
    machine: { memoryBytes: 16 * MiB, cpus: 2, disks: [{ path: "/x.img", readOnly: false }] },
    vm: vmState(),
    vcpus: [vcpuState(), vcpuState()],
    devices: { serial: [1, 2, 3] },
    annotations: { agent: { nproc: 2 } },
  };
}

/** Write a snapshot of 16 MiB of RAM with two non-zero pages. */
function writeOne(dir: string, b = body()): void {
  const memory = GuestMemory.forTest(16 * MiB);
  memory.writeU32(0x1000, 0xfeedface);
  memory.writeU32(9 * MiB, 42);
  writeSnapshotDir(dir, { tskvmVersion: VERSION, body: b, writeRam: (fd) => writeRamFile(memory, fd) });
}

function refused(fn: () => unknown, kind: SnapshotErrorKind, pattern: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof SnapshotError, `not a SnapshotError: ${String(e)}`);
    assert.equal(e.kind, kind, e.message);
    assert.match(e.message, pattern);
    assert.doesNotMatch(e.message, /\n/, "one line");
    return true;
  });
}

/** Rewrite snapshot.json (read-only on disk) through `edit`. */
function editState(dir: string, edit: (text: string) => string): void {
  const path = join(dir, STATE_FILE);
  const text = fs.readFileSync(path, "utf8");
  fs.chmodSync(path, 0o644);
  fs.writeFileSync(path, edit(text));
}

test("a snapshot reads back exactly as written, its files read-only", () => {
  withDir((root) => {
    const dir = join(root, "snap");
    const b = body();
    writeOne(dir, b);
    assert.deepEqual(fs.readdirSync(root), ["snap"], "no temporary directory left");
    assert.deepEqual(fs.readdirSync(dir).sort(), [RAM_FILE, STATE_FILE]);
    for (const f of [RAM_FILE, STATE_FILE]) assert.equal(fs.statSync(join(dir, f)).mode & 0o222, 0, `${f} is writable`);
    const got = readSnapshotDir(dir, { tskvmVersion: VERSION, verifyRam: true });
    assert.equal(got.tskvmVersion, VERSION);
    assert.deepEqual(got.body.vcpus, b.vcpus);
    assert.deepEqual(got.body.vm, b.vm);
    assert.deepEqual(got.body.host, b.host);
    assert.deepEqual(got.body.machine, b.machine);
    assert.deepEqual(got.body.devices, b.devices);
    assert.deepEqual(got.body.annotations, b.annotations);
    assert.equal(got.body.ram.bytes, 16 * MiB);
    assert.equal(got.body.ram.dataBytes, 2 * 4096);
    assert.equal(got.ramPath, join(dir, RAM_FILE));
  });
});

test("a missing or empty directory is no snapshot", () => {
  withDir((root) => {
    refused(() => readSnapshotDir(join(root, "nope"), { tskvmVersion: VERSION }), "missing", /no snapshot at .*nope: it does not exist/);
    fs.mkdirSync(join(root, "empty"));
    refused(() => readSnapshotDir(join(root, "empty"), { tskvmVersion: VERSION }), "missing", /is not a tskvm snapshot \(it has no snapshot.json\)/);
  });
});

test("a truncated snapshot.json is refused as corrupted", () => {
  withDir((root) => {
    const dir = join(root, "s");
    writeOne(dir);
    editState(dir, (t) => t.slice(0, Math.floor(t.length / 2)));
    refused(() => readSnapshotDir(dir, { tskvmVersion: VERSION }), "corrupted", /is corrupted: snapshot.json is truncated or not JSON/);
  });
});

test("a changed value is caught by the checksum", () => {
  withDir((root) => {
    const dir = join(root, "s");
    writeOne(dir);
    editState(dir, (t) => t.replace('"cpus":2', '"cpus":3'));
    refused(() => readSnapshotDir(dir, { tskvmVersion: VERSION }), "corrupted", /checksum does not match/);
  });
});

test("a truncated or missing RAM file is refused before anything maps it", () => {
  withDir((root) => {
    const dir = join(root, "s");
    writeOne(dir);
    fs.chmodSync(join(dir, RAM_FILE), 0o644);
    fs.truncateSync(join(dir, RAM_FILE), 4096);
    refused(() => readSnapshotDir(dir, { tskvmVersion: VERSION }), "corrupted", /RAM file holds 4096 bytes, not 16777216/);
    fs.rmSync(join(dir, RAM_FILE));
    refused(() => readSnapshotDir(dir, { tskvmVersion: VERSION }), "corrupted", /RAM file memory.ram is missing/);
  });
});

test("changed RAM contents are found when RAM is verified", () => {
  withDir((root) => {
    const dir = join(root, "s");
    writeOne(dir);
    const path = join(dir, RAM_FILE);
    fs.chmodSync(path, 0o644);
    const fd = fs.openSync(path, "r+");
    fs.writeSync(fd, Buffer.from([1]), 0, 1, 0x1000);
    fs.closeSync(fd);
    assert.doesNotThrow(() => readSnapshotDir(dir, { tskvmVersion: VERSION }), "without verifyRam only the size is checked");
    refused(() => readSnapshotDir(dir, { tskvmVersion: VERSION, verifyRam: true }), "corrupted", /RAM file's contents do not match/);
  });
});

test("a foreign directory or file is not a tskvm snapshot", () => {
  withDir((root) => {
    const dir = join(root, "s");
    fs.mkdirSync(dir);
    fs.writeFileSync(join(dir, STATE_FILE), randomBytes(300));
    refused(() => readSnapshotDir(dir, { tskvmVersion: VERSION }), "foreign", /is not a tskvm snapshot \(snapshot.json is not JSON\)/);
    fs.writeFileSync(join(dir, STATE_FILE), JSON.stringify({ format: "firecracker", version: "1.0" }));
    refused(() => readSnapshotDir(dir, { tskvmVersion: VERSION }), "foreign", /says format "firecracker"/);
    fs.writeFileSync(join(dir, STATE_FILE), "[1,2,3]");
    refused(() => readSnapshotDir(dir, { tskvmVersion: VERSION }), "foreign", /says format null/);
  });
});

test("a snapshot from another tskvm version or format version is refused", () => {
  withDir((root) => {
    const dir = join(root, "s");
    writeOne(dir);
    refused(() => readSnapshotDir(dir, { tskvmVersion: "9.9.9" }), "version", /made by tskvm 1\.2\.3 \(snapshot format 1\); this is tskvm 9\.9\.9 \(format 1\): make the snapshot again/);
    editState(dir, (t) => t.replace('"formatVersion":1', '"formatVersion":2'));
    refused(() => readSnapshotDir(dir, { tskvmVersion: VERSION }), "version", /snapshot format 2/);
  });
});

test("a body with the right checksum but a wrong blob size is refused by field", () => {
  withDir((root) => {
    const dir = join(root, "s");
    const b = body();
    b.vcpus[1]!.lapic = new Uint8Array(100);
    writeOne(dir, b);
    refused(() => readSnapshotDir(dir, { tskvmVersion: VERSION }), "corrupted", /vcpus\[1\]\.lapic holds 100 bytes, not 1024/);
  });
});

test("a RAM file name that points outside the snapshot is refused", () => {
  withDir((root) => {
    const dir = join(root, "s");
    writeOne(dir);
    editState(dir, (t) => {
      const env = JSON.parse(t);
      env.body.ram.file = "../../etc/passwd";
      const bodyText = JSON.stringify(env.body);
      env.checksum = "sha256:" + require("node:crypto").createHash("sha256").update(bodyText).digest("hex");
      return JSON.stringify(env);
    });
    refused(() => readSnapshotDir(dir, { tskvmVersion: VERSION }), "corrupted", /ram.file names a path outside the snapshot/);
  });
});

test("an existing snapshot is never overwritten; an unwritable place fails with one line and leaves nothing", () => {
  withDir((root) => {
    const dir = join(root, "s");
    writeOne(dir);
    refused(() => writeOne(dir), "unwritable", /it already exists and is not empty/);
    fs.writeFileSync(join(root, "file"), "x");
    refused(() => writeOne(join(root, "file", "s")), "unwritable", /cannot write a snapshot to .*: a part of the path is not a directory/);
    refused(() => writeOne(join(root, "no", "such", "s")), "unwritable", /its parent directory does not exist/);
    assert.deepEqual(fs.readdirSync(root).sort(), ["file", "s"]);
  });
});

test("a failure while RAM is written leaves no directory behind", () => {
  withDir((root) => {
    const dir = join(root, "s");
    refused(
      () =>
        writeSnapshotDir(dir, {
          tskvmVersion: VERSION,
          body: body(),
          writeRam: () => {
            throw Object.assign(new Error("no space"), { code: "ENOSPC" });
          },
        }),
      "unwritable",
      /no space left on the device/,
    );
    assert.deepEqual(fs.readdirSync(root), []);
  });
});

test("two writers racing for one directory: the second learns it lost, the first's snapshot stays", () => {
  withDir((root) => {
    const dir = join(root, "s");
    const memory = GuestMemory.forTest(16 * MiB);
    assert.throws(
      () =>
        writeSnapshotDir(dir, {
          tskvmVersion: VERSION,
          body: body(),
          writeRam: (fd) => {
            writeOne(dir); // the other writer finishes meanwhile
            return writeRamFile(memory, fd);
          },
        }),
      (e: unknown) => e instanceof SnapshotError && e.raced && /another tskvm wrote a snapshot to .* first/.test(e.message),
    );
    assert.doesNotThrow(() => readSnapshotDir(dir, { tskvmVersion: VERSION, verifyRam: true }));
    assert.deepEqual(fs.readdirSync(root), ["s"]);
  });
});

test("the host check names what this host lacks", () => {
  const saved = hostFacts();
  const vcpus = [vcpuState()];
  const check = (current: HostFacts, xsave = 4096) => () => checkHostFacts("/snap", saved, current, vcpus, xsave);
  assert.doesNotThrow(check(hostFacts()));
  refused(check({ ...hostFacts(), kvmKind: "emulated-pvm" }), "host", /made with hardware-intel KVM, this host has emulated-pvm/);
  refused(check({ ...hostFacts(), cpuVendor: "AuthenticAMD" }), "host", /made on a GenuineIntel CPU, this host has a AuthenticAMD one/);
  refused(check({ ...hostFacts(), caps: { XSAVE: 1, XCRS: 0, VCPU_EVENTS: 1, XSAVE2: 4096 } }), "host", /lacks KVM_CAP_XCRS/);
  const noAvx512 = hostFacts();
  noAvx512.supportedCpuid = cpuid().map((e) => (e.function === 7 ? { ...e, ebx: 1 << 5 } : e));
  refused(check(noAvx512), "host", /lacks avx512f, which the guest uses/);
  refused(check({ ...hostFacts(), msrIndexList: [0x10] }), "host", /cannot restore MSR 0x4b564d01/);
  refused(check(hostFacts(), 8192), "host", /XSAVE state is 4096 bytes, this host's KVM uses 8192/);
});

test("features the guest never saw, or tskvm set itself, are not asked of the host", () => {
  const guest = cpuid().map((e) => (e.function === 7 ? { ...e, ebx: 1 << 5 } : e)); // avx512f hidden from the guest
  const savedSupported = cpuid();
  const supported = cpuid().map((e) => (e.function === 7 ? { ...e, ebx: 1 << 5 } : e.function === 1 ? { ...e, ecx: 1 } : e));
  // leaf 1 ECX bit 31 (hypervisor) is tskvm's own and bit 28 (avx) was supported: only avx is missing.
  assert.deepEqual(missingFeatures(guest, savedSupported.map((e) => (e.function === 1 ? { ...e, ecx: (1 | (1 << 28)) >>> 0 } : e)), supported), ["avx"]);
});
