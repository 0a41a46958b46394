/**
 * The snapshot directory: what is in it, how it is written so that no reader ever sees half
 * of one, and how a reader checks it before anything is built from it.
 *
 *   DIR/snapshot.json   the envelope: format name and version, the tskvm version that wrote
 *                       it, when, a SHA-256 checksum, and the body: the host's KVM/CPU facts,
 *                       the machine's configuration, the KVM state of the VM and of every
 *                       vCPU (kernel structs as base64), every device's state, and the RAM
 *                       file's size. JSON, so it says what each field is.
 *   DIR/memory.ram      guest RAM, sparse: zero pages are holes (src/memory/ram-file.ts).
 *
 * The checksum covers the body as serialized (JSON.stringify of the parsed body gives the
 * same text back, so a reader recomputes it from what it parsed). RAM is checked by size,
 * and by the SHA-256 of its data when asked (verifyRam): reading all of it would cost what
 * a copy-on-write restore is there to avoid.
 *
 * Writing: into a fresh sibling directory, files flushed and made read-only (a restored VM
 * maps memory.ram copy-on-write, so the file must never change), then renamed into place.
 * A crash leaves at most a stale ".DIR.tmp-*" directory, never a half snapshot; of two
 * writers racing for one DIR, one wins and the other's work is discarded.
 */
import * as fs from "node:fs";
import { basename, dirname, join } from "node:path";
import { createHash, randomBytes } from "node:crypto";
import type { MsrEntry } from "../../kvm/vcpu";
import type { CpuidEntry } from "../../kvm/cpuid";
import { VCPU_STATE_SIZES, type VcpuState, type VcpuStateBlob } from "../../kvm/vcpu-state";
import { VM_STATE_SIZES, type VmState, type VmStateBlob } from "../../kvm/vm-state";
import { KvmXsave } from "../../kvm/abi";
import { PAGE_SIZE, forEachDataExtent } from "../../memory/ram-file";

export const SNAPSHOT_FORMAT = "tskvm-snapshot";
export const SNAPSHOT_FORMAT_VERSION = 1;
export const STATE_FILE = "snapshot.json";
export const RAM_FILE = "memory.ram";

export type SnapshotErrorKind =
  /** DIR holds no snapshot (missing, empty, not a directory). */
  | "missing"
  /** Not a tskvm snapshot at all. */
  | "foreign"
  /** A tskvm snapshot of another format or tskvm version. */
  | "version"
  /** Truncated, altered or inconsistent. */
  | "corrupted"
  /** Made on a host whose KVM or CPU cannot run it. */
  | "host"
  /** Something the snapshot refers to changed (a disk image). */
  | "changed"
  /** The VM cannot be snapshotted in its present state. */
  | "state"
  /** The snapshot could not be written. */
  | "unwritable";

/** Why a snapshot cannot be written or used; the message is one line. */
export class SnapshotError extends Error {
  /** Set when another writer completed the same snapshot directory first (not a failure for a cache). */
  readonly raced: boolean;

  constructor(
    readonly kind: SnapshotErrorKind,
    message: string,
    opts: { raced?: boolean } = {},
  ) {
    super(message);
    this.name = "SnapshotError";
    this.raced = opts.raced ?? false;
  }
}

/** JSON values, for the parts of the body other layers own (machine config, devices). */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** The facts about the host a snapshot depends on (host-facts.ts collects and compares them). */
export interface HostFacts {
  /** detectHostKvm().kind */
  kvmKind: string;
  apiVersion: number;
  /** KVM capabilities the saved state depends on, by name, with KVM's answers. */
  caps: Record<string, number>;
  /** KVM_GET_SUPPORTED_CPUID's vendor string and family/model/stepping word, for messages. */
  cpuVendor: string;
  cpuSignature: number;
  /** KVM_GET_SUPPORTED_CPUID entries. */
  supportedCpuid: CpuidEntry[];
  /** KVM_GET_MSR_INDEX_LIST */
  msrIndexList: number[];
  /** KVM_GET_TSC_KHZ of a vCPU, 0 when unknown. */
  tscKhz: number;
}

export interface SnapshotRam {
  /** File name inside the snapshot directory. */
  file: string;
  /** Guest RAM size = the file's length. */
  bytes: number;
  /** Bytes of data (not holes) written. */
  dataBytes: number;
  /**
   * Bytes of RAM the guest had touched (pages in the page tables, or else read to be sure):
   * what the data is compared with; 0 when not known.
   */
  touchedBytes: number;
  /** SHA-256 over the data extents (offset, length, bytes of each), hex. */
  dataSha256: string;
}

export interface SnapshotBody {
  host: HostFacts;
  /** How to rebuild the machine (memory, vCPUs, devices and their back ends): vmm's own shape. */
  machine: Json;
  vm: VmState;
  vcpus: VcpuState[];
  /** Every device's state: vmm's own shape. */
  devices: Json;
  /** What the layers above the machine keep with a snapshot (the API: the guest agent's state). */
  annotations: Json;
  ram: SnapshotRam;
}

export interface SnapshotEnvelope {
  format: string;
  formatVersion: number;
  tskvm: string;
  createdAt: string;
  checksum: string;
  body: Json;
}

// ---- encoding of the KVM state: blobs as base64, 64-bit values as decimal strings ----

const b64 = (bytes: Uint8Array): string => Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("base64");

function encodeMsrs(msrs: readonly MsrEntry[]): Json {
  return msrs.map((m) => [m.index, m.data.toString()]);
}

function encodeCpuid(entries: readonly CpuidEntry[]): Json {
  return entries.map((e) => [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx]);
}

export function encodeVcpuState(s: VcpuState): Json {
  const out: { [key: string]: Json } = { mpState: s.mpState, msrs: encodeMsrs(s.msrs), cpuid: encodeCpuid(s.cpuid) };
  for (const key of Object.keys(VCPU_STATE_SIZES) as VcpuStateBlob[]) {
    const blob = s[key];
    if (blob !== undefined) out[key] = b64(blob);
  }
  if (s.tscKhz !== undefined) out["tscKhz"] = s.tscKhz;
  return out;
}

export function encodeVmState(s: VmState): Json {
  const out: { [key: string]: Json } = {};
  for (const key of Object.keys(VM_STATE_SIZES) as VmStateBlob[]) {
    const blob = s[key];
    if (blob !== undefined) out[key] = b64(blob);
  }
  if (s.clock !== undefined) {
    out["clock"] = { clock: s.clock.clock.toString(), flags: s.clock.flags, hostRealtimeNs: s.clock.hostRealtimeNs.toString() };
  }
  return out;
}

/**
 * Reads typed fields out of parsed JSON; any surprise is a "corrupted" SnapshotError naming
 * the field, so no malformed value gets near an ioctl.
 */
export class Reader {
  constructor(
    private readonly where: string,
    private readonly describe: string,
  ) {}

  fail(path: string, what: string): never {
    throw new SnapshotError("corrupted", `snapshot ${this.where} is corrupted: ${path} ${what}`);
  }

  object(v: unknown, path: string): Record<string, unknown> {
    if (typeof v !== "object" || v === null || Array.isArray(v)) this.fail(path, "is not an object");
    return v as Record<string, unknown>;
  }

  array(v: unknown, path: string): unknown[] {
    if (!Array.isArray(v)) this.fail(path, "is not a list");
    return v;
  }

  int(v: unknown, path: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v < min || v > max) this.fail(path, `is not an integer in ${min}..${max}`);
    return v;
  }

  u32(v: unknown, path: string): number {
    return this.int(v, path, 0, 0xffff_ffff);
  }

  string(v: unknown, path: string): string {
    if (typeof v !== "string") this.fail(path, "is not a string");
    return v;
  }

  u64(v: unknown, path: string): bigint {
    if (typeof v !== "string" || !/^\d{1,20}$/.test(v) || BigInt(v) >= 1n << 64n) this.fail(path, "is not a 64-bit number");
    return BigInt(v);
  }

  /** A base64 blob of any length. */
  bytes(v: unknown, path: string): Uint8Array {
    if (typeof v !== "string" || !/^[A-Za-z0-9+/]*={0,2}$/.test(v)) this.fail(path, "is not base64");
    return new Uint8Array(Buffer.from(v, "base64"));
  }

  /** A base64 blob of exactly `size` bytes (or at least `size`, in 4-byte words, when `orMore`). */
  blob(v: unknown, path: string, size: number, orMore = false): Uint8Array {
    const bytes = this.bytes(v, path);
    if (orMore ? bytes.length < size || bytes.length % 4 !== 0 : bytes.length !== size) {
      this.fail(path, `holds ${bytes.length} bytes, not ${orMore ? "at least " : ""}${size} (${this.describe})`);
    }
    return bytes;
  }
}

function decodeCpuid(r: Reader, v: unknown, path: string): CpuidEntry[] {
  return r.array(v, path).map((e, i) => {
    const f = r.array(e, `${path}[${i}]`);
    if (f.length !== 7) r.fail(`${path}[${i}]`, "is not 7 numbers");
    const [fn, index, flags, eax, ebx, ecx, edx] = f.map((x, j) => r.u32(x, `${path}[${i}][${j}]`)) as [number, number, number, number, number, number, number];
    return { function: fn, index, flags, eax, ebx, ecx, edx };
  });
}

export function decodeVcpuState(r: Reader, v: unknown, path: string): VcpuState {
  const o = r.object(v, path);
  const state: VcpuState = {
    mpState: r.u32(o["mpState"], `${path}.mpState`),
    regs: r.blob(o["regs"], `${path}.regs`, VCPU_STATE_SIZES.regs),
    sregs: r.blob(o["sregs"], `${path}.sregs`, VCPU_STATE_SIZES.sregs),
    msrs: r.array(o["msrs"], `${path}.msrs`).map((e, i) => {
      const pair = r.array(e, `${path}.msrs[${i}]`);
      if (pair.length !== 2) r.fail(`${path}.msrs[${i}]`, "is not [index, value]");
      return { index: r.u32(pair[0], `${path}.msrs[${i}][0]`), data: r.u64(pair[1], `${path}.msrs[${i}][1]`) };
    }),
    cpuid: decodeCpuid(r, o["cpuid"], `${path}.cpuid`),
  };
  for (const key of ["xsave", "fpu", "xcrs", "debugRegs", "lapic", "events"] as const) {
    if (o[key] === undefined) continue;
    state[key] = r.blob(o[key], `${path}.${key}`, VCPU_STATE_SIZES[key], key === "xsave");
  }
  if (state.xsave === undefined && state.fpu === undefined) r.fail(path, "has neither XSAVE nor FPU state");
  if (o["tscKhz"] !== undefined) state.tscKhz = r.u32(o["tscKhz"], `${path}.tscKhz`);
  return state;
}

export function decodeVmState(r: Reader, v: unknown, path: string): VmState {
  const o = r.object(v, path);
  const state: VmState = {};
  for (const key of Object.keys(VM_STATE_SIZES) as VmStateBlob[]) {
    if (o[key] !== undefined) state[key] = r.blob(o[key], `${path}.${key}`, VM_STATE_SIZES[key]);
  }
  if (o["clock"] !== undefined) {
    const c = r.object(o["clock"], `${path}.clock`);
    state.clock = {
      clock: r.u64(c["clock"], `${path}.clock.clock`),
      flags: r.u32(c["flags"], `${path}.clock.flags`),
      hostRealtimeNs: r.u64(c["hostRealtimeNs"], `${path}.clock.hostRealtimeNs`),
    };
  }
  return state;
}

function encodeHost(h: HostFacts): Json {
  return {
    kvmKind: h.kvmKind,
    apiVersion: h.apiVersion,
    caps: h.caps,
    cpuVendor: h.cpuVendor,
    cpuSignature: h.cpuSignature,
    supportedCpuid: encodeCpuid(h.supportedCpuid),
    msrIndexList: h.msrIndexList,
    tscKhz: h.tscKhz,
  };
}

function decodeHost(r: Reader, v: unknown, path: string): HostFacts {
  const o = r.object(v, path);
  const caps: Record<string, number> = {};
  for (const [k, x] of Object.entries(r.object(o["caps"], `${path}.caps`))) caps[k] = r.int(x, `${path}.caps.${k}`, -1);
  return {
    kvmKind: r.string(o["kvmKind"], `${path}.kvmKind`),
    apiVersion: r.u32(o["apiVersion"], `${path}.apiVersion`),
    caps,
    cpuVendor: r.string(o["cpuVendor"], `${path}.cpuVendor`),
    cpuSignature: r.u32(o["cpuSignature"], `${path}.cpuSignature`),
    supportedCpuid: decodeCpuid(r, o["supportedCpuid"], `${path}.supportedCpuid`),
    msrIndexList: r.array(o["msrIndexList"], `${path}.msrIndexList`).map((x, i) => r.u32(x, `${path}.msrIndexList[${i}]`)),
    tscKhz: r.u32(o["tscKhz"], `${path}.tscKhz`),
  };
}

export function encodeBody(b: SnapshotBody): Json {
  return {
    host: encodeHost(b.host),
    machine: b.machine,
    vm: encodeVmState(b.vm),
    vcpus: b.vcpus.map(encodeVcpuState),
    devices: b.devices,
    annotations: b.annotations,
    ram: { file: b.ram.file, bytes: b.ram.bytes, dataBytes: b.ram.dataBytes, touchedBytes: b.ram.touchedBytes, dataSha256: b.ram.dataSha256 },
  };
}

export function decodeBody(r: Reader, v: unknown): SnapshotBody {
  const o = r.object(v, "body");
  const ram = r.object(o["ram"], "ram");
  const file = r.string(ram["file"], "ram.file");
  if (file !== basename(file) || file.startsWith(".")) r.fail("ram.file", `names a path outside the snapshot (${JSON.stringify(file)})`);
  const vcpus = r.array(o["vcpus"], "vcpus").map((x, i) => decodeVcpuState(r, x, `vcpus[${i}]`));
  if (vcpus.length === 0) r.fail("vcpus", "is empty");
  const dataSha256 = r.string(ram["dataSha256"], "ram.dataSha256");
  if (!/^[0-9a-f]{64}$/.test(dataSha256)) r.fail("ram.dataSha256", "is not a SHA-256");
  return {
    host: decodeHost(r, o["host"], "host"),
    machine: (o["machine"] ?? null) as Json,
    vm: decodeVmState(r, o["vm"], "vm"),
    vcpus,
    devices: (o["devices"] ?? null) as Json,
    annotations: (o["annotations"] ?? null) as Json,
    ram: {
      file,
      bytes: r.int(ram["bytes"], "ram.bytes", 4096),
      dataBytes: r.int(ram["dataBytes"], "ram.dataBytes"),
      touchedBytes: r.int(ram["touchedBytes"], "ram.touchedBytes"),
      dataSha256,
    },
  };
}

function sha256(text: string): string {
  return "sha256:" + createHash("sha256").update(text).digest("hex");
}

// ---- the directory ----

export interface WrittenSnapshot {
  dir: string;
  stateBytes: number;
  ram: SnapshotRam;
}

function fsyncPath(path: string, flags = "r"): void {
  const fd = fs.openSync(path, flags);
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Write a snapshot into `dir`, which must not exist yet (or be an empty directory).
 * `writeRam(fd)` writes guest RAM into the open RAM file and returns its size and data
 * bytes. Fails with a SnapshotError("unwritable") and leaves nothing behind; when another
 * writer finished the same `dir` first, throws SnapshotError("unwritable") with `raced`.
 */
export function writeSnapshotDir(
  dir: string,
  opts: {
    tskvmVersion: string;
    body: Omit<SnapshotBody, "ram">;
    writeRam: (fd: number) => { totalBytes: number; dataBytes: number; pagesRead: number };
  },
): WrittenSnapshot {
  const parent = dirname(dir);
  if (existsNonEmpty(dir)) throw new SnapshotError("unwritable", `cannot write a snapshot to ${dir}: it already exists and is not empty`);
  const tmp = join(parent, `.${basename(dir)}.tmp-${process.pid}-${randomBytes(4).toString("hex")}`);
  try {
    fs.mkdirSync(tmp, { mode: 0o755 });
  } catch (e) {
    throw new SnapshotError("unwritable", `cannot write a snapshot to ${dir}: ${describeFsError(e)}`);
  }
  try {
    const ramPath = join(tmp, RAM_FILE);
    const fd = fs.openSync(ramPath, "wx", 0o444);
    let ramStats: { totalBytes: number; dataBytes: number; pagesRead: number };
    try {
      ramStats = opts.writeRam(fd);
      fs.fdatasyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    const ram: SnapshotRam = {
      file: RAM_FILE,
      bytes: ramStats.totalBytes,
      dataBytes: ramStats.dataBytes,
      touchedBytes: ramStats.pagesRead * PAGE_SIZE,
      dataSha256: ramDataSha256(ramPath),
    };
    const body = encodeBody({ ...opts.body, ram });
    const bodyText = JSON.stringify(body);
    const envelope: SnapshotEnvelope = {
      format: SNAPSHOT_FORMAT,
      formatVersion: SNAPSHOT_FORMAT_VERSION,
      tskvm: opts.tskvmVersion,
      createdAt: new Date().toISOString(),
      checksum: sha256(bodyText),
      body,
    };
    const text = JSON.stringify(envelope) + "\n";
    const statePath = join(tmp, STATE_FILE);
    fs.writeFileSync(statePath, text, { mode: 0o444, flag: "wx" });
    fsyncPath(statePath);
    fsyncPath(tmp);
    try {
      // rename(2) replaces an empty directory and fails on a non-empty one: a racing
      // writer that got there first keeps its snapshot.
      fs.renameSync(tmp, dir);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === "ENOTEMPTY" || code === "EEXIST") {
        throw new SnapshotError("unwritable", `another tskvm wrote a snapshot to ${dir} first`, { raced: true });
      }
      throw e;
    }
    fsyncPath(parent);
    return { dir, stateBytes: Buffer.byteLength(text), ram };
  } catch (e) {
    removeTree(tmp);
    if (e instanceof SnapshotError) throw e;
    throw new SnapshotError("unwritable", `cannot write a snapshot to ${dir}: ${describeFsError(e)}`);
  }
}

/** Remove a snapshot directory (its files are read-only; the directory is not). */
export function removeSnapshotDir(dir: string): void {
  removeTree(dir);
}

function removeTree(path: string): void {
  try {
    fs.rmSync(path, { recursive: true, force: true });
  } catch {
    // Best effort: a leftover .tmp directory is harmless and named as such.
  }
}

function existsNonEmpty(dir: string): boolean {
  try {
    return fs.readdirSync(dir).length > 0;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    // Nothing there (or a path through a file, which mkdir reports): a place to try.
    if (code === "ENOENT" || code === "ENOTDIR") return false;
    // A file, or unreadable: not a place for a new snapshot.
    return true;
  }
}

function describeFsError(e: unknown): string {
  const err = e as NodeJS.ErrnoException;
  const texts: Record<string, string> = {
    ENOENT: "its parent directory does not exist",
    EACCES: "permission denied",
    EPERM: "permission denied",
    EROFS: "the file system is read-only",
    ENOSPC: "no space left on the device",
    EDQUOT: "disk quota exceeded",
    ENOTDIR: "a part of the path is not a directory",
  };
  return (err.code !== undefined ? texts[err.code] : undefined) ?? err.message ?? String(e);
}

/**
 * SHA-256 over the data extents of a RAM file: each extent's offset and length (8 bytes
 * each, little-endian) then its bytes. Reads only data, never holes.
 */
export function ramDataSha256(path: string): string {
  const hash = createHash("sha256");
  const fd = fs.openSync(path, "r");
  try {
    const buf = Buffer.alloc(1 << 20);
    forEachDataExtent(fd, (offset, length) => {
      const head = Buffer.alloc(16);
      head.writeBigUInt64LE(BigInt(offset), 0);
      head.writeBigUInt64LE(BigInt(length), 8);
      hash.update(head);
      for (let done = 0; done < length; ) {
        const n = fs.readSync(fd, buf, 0, Math.min(buf.length, length - done), offset + done);
        if (n <= 0) throw new Error(`the RAM file ended early at ${offset + done}`);
        hash.update(buf.subarray(0, n));
        done += n;
      }
    });
  } finally {
    fs.closeSync(fd);
  }
  return hash.digest("hex");
}

export interface ReadSnapshot {
  dir: string;
  tskvmVersion: string;
  createdAt: string;
  body: SnapshotBody;
  ramPath: string;
}

/**
 * Read and check a snapshot directory: its envelope, format and version, checksum, every
 * field of the body, and the RAM file's size (its data's checksum too with verifyRam).
 * Throws a SnapshotError whose kind and one-line message say what is wrong.
 */
export function readSnapshotDir(dir: string, opts: { tskvmVersion: string; verifyRam?: boolean }): ReadSnapshot {
  const statePath = join(dir, STATE_FILE);
  let text: string;
  try {
    if (!fs.statSync(dir).isDirectory()) throw new SnapshotError("missing", `${dir} is not a snapshot directory`);
    text = fs.readFileSync(statePath, "utf8");
  } catch (e) {
    if (e instanceof SnapshotError) throw e;
    const code = (e as NodeJS.ErrnoException).code;
    if (code === "ENOENT") {
      throw new SnapshotError("missing", fs.existsSync(dir) ? `${dir} is not a tskvm snapshot (it has no ${STATE_FILE})` : `no snapshot at ${dir}: it does not exist`);
    }
    throw new SnapshotError("missing", `cannot read the snapshot in ${dir}: ${describeFsError(e)}`);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    // A snapshot.json cut short is invalid JSON: the likeliest damage.
    throw new SnapshotError(text.trimStart().startsWith("{") ? "corrupted" : "foreign", text.trimStart().startsWith("{")
      ? `snapshot ${dir} is corrupted: ${STATE_FILE} is truncated or not JSON`
      : `${dir} is not a tskvm snapshot (${STATE_FILE} is not JSON)`);
  }
  const r = new Reader(dir, "not what this tskvm writes");
  const env = typeof parsed === "object" && parsed !== null && !Array.isArray(parsed) ? (parsed as Record<string, unknown>) : {};
  if (env["format"] !== SNAPSHOT_FORMAT) throw new SnapshotError("foreign", `${dir} is not a tskvm snapshot (its ${STATE_FILE} says format ${JSON.stringify(env["format"] ?? null)})`);
  const version = env["formatVersion"];
  const writer = typeof env["tskvm"] === "string" ? env["tskvm"] : "an unknown version";
  if (version !== SNAPSHOT_FORMAT_VERSION || writer !== opts.tskvmVersion) {
    throw new SnapshotError(
      "version",
      `snapshot ${dir} was made by tskvm ${writer} (snapshot format ${String(version)}); this is tskvm ${opts.tskvmVersion} (format ${SNAPSHOT_FORMAT_VERSION}): make the snapshot again`,
    );
  }
  const checksum = r.string(env["checksum"], "checksum");
  if (sha256(JSON.stringify(env["body"] ?? null)) !== checksum) throw new SnapshotError("corrupted", `snapshot ${dir} is corrupted: its checksum does not match its contents`);
  const body = decodeBody(r, env["body"]);
  const ramPath = join(dir, body.ram.file);
  let size: number;
  try {
    size = fs.statSync(ramPath).size;
  } catch {
    throw new SnapshotError("corrupted", `snapshot ${dir} is corrupted: its RAM file ${body.ram.file} is missing`);
  }
  if (size !== body.ram.bytes) {
    throw new SnapshotError("corrupted", `snapshot ${dir} is corrupted: its RAM file holds ${size} bytes, not ${body.ram.bytes}`);
  }
  const xsaveSizes = new Set(body.vcpus.map((v) => v.xsave?.length ?? KvmXsave.size));
  if (xsaveSizes.size > 1) r.fail("vcpus", "disagree on the XSAVE size");
  if (opts.verifyRam === true && ramDataSha256(ramPath) !== body.ram.dataSha256) {
    throw new SnapshotError("corrupted", `snapshot ${dir} is corrupted: its RAM file's contents do not match its checksum`);
  }
  return { dir, tskvmVersion: writer, createdAt: typeof env["createdAt"] === "string" ? env["createdAt"] : "", body, ramPath };
}
