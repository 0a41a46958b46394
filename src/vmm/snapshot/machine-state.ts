/**
 * The machine's parts of a snapshot body: how to rebuild the machine (memory, vCPUs, CPU
 * template, devices and the host resources behind them) and every device's state (the
 * device set's SharedArrayBuffers, byte for byte, and each virtio device's queue
 * positions). Plain JSON, read back field by field with format.ts's Reader.
 */
import type { VirtqueueState } from "../../devices/virtio/queue";
import type { FileIdentity } from "../../host/file-identity";
import { Reader, SnapshotError, type Json } from "./format";

/** A disk as the snapshot knows it. */
export interface SavedDisk {
  path: string;
  readOnly: boolean;
  serial: string;
  /** The image when the snapshot was taken. */
  identity: FileIdentity;
  /**
   * The guest held none of the disk's contents (not mounted, caches dropped): a restore
   * attaches the image as it is then, whatever it holds, so a per-run test disk is current.
   * Otherwise the image must be the one the snapshot saw, unchanged.
   */
  detached: boolean;
}

/** A NIC on a TAP (reopened by name), or on a stream socket (passt's: a fresh one is connected at restore). */
export type SavedNic = SavedTapNic | SavedStreamNic;

export interface SavedTapNic {
  kind: "tap";
  tap: string;
  /** "52:54:00:12:34:56" */
  mac: string;
  hostCidr?: string;
}

export interface SavedStreamNic {
  kind: "stream";
  /** For messages: "passt". */
  name: string;
  mac: string;
}

/**
 * A virtio-fs share. Saved only while the guest had made no request on it (the FUSE session
 * lives in virtiofsd and had not begun), so a restore serves it from a fresh virtiofsd on
 * whatever directory is given then.
 */
export interface SavedShare {
  tag: string;
}

export interface SavedMachine {
  memoryBytes: number;
  cpus: number;
  cpuTemplate: string;
  hideFeatures: string[];
  irqchip: boolean;
  /** A virtio-rng device after the disks and NICs. */
  rng: boolean;
  /** What was booted, for messages ("ELF vmlinux, PVH entry at ..."). */
  bootDescription: string;
  cmdline?: string;
  disks: SavedDisk[];
  nics: SavedNic[];
  /** After the NICs, before the virtio-rng device. */
  shares: SavedShare[];
}

export interface SavedDevices {
  /** deviceSetBuffers(): name -> the buffer's bytes. */
  buffers: Map<string, Uint8Array>;
  /** By virtio function: its queues' positions (undefined: the driver had not started it). */
  queues: ((VirtqueueState | undefined)[] | undefined)[];
}

export function encodeMachine(m: SavedMachine): Json {
  return {
    memoryBytes: m.memoryBytes,
    cpus: m.cpus,
    cpuTemplate: m.cpuTemplate,
    hideFeatures: m.hideFeatures,
    irqchip: m.irqchip,
    rng: m.rng,
    bootDescription: m.bootDescription,
    ...(m.cmdline !== undefined ? { cmdline: m.cmdline } : {}),
    disks: m.disks.map((d) => ({ path: d.path, readOnly: d.readOnly, serial: d.serial, detached: d.detached, identity: { ...d.identity } })),
    nics: m.nics.map((n): Json =>
      n.kind === "stream" ? { kind: "stream", name: n.name, mac: n.mac } : { kind: "tap", tap: n.tap, mac: n.mac, ...(n.hostCidr !== undefined ? { hostCidr: n.hostCidr } : {}) },
    ),
    shares: m.shares.map((sh) => ({ tag: sh.tag })),
  };
}

export function decodeMachine(r: Reader, v: unknown): SavedMachine {
  const o = r.object(v, "machine");
  const bool = (x: unknown, path: string): boolean => (typeof x === "boolean" ? x : r.fail(path, "is not true or false"));
  const digits = (x: unknown, path: string): string => (typeof x === "string" && /^\d+$/.test(x) ? x : r.fail(path, "is not a number string"));
  const disks = r.array(o["disks"], "machine.disks").map((x, i): SavedDisk => {
    const d = r.object(x, `machine.disks[${i}]`);
    const id = r.object(d["identity"], `machine.disks[${i}].identity`);
    const p = `machine.disks[${i}].identity`;
    return {
      path: r.string(d["path"], `machine.disks[${i}].path`),
      readOnly: bool(d["readOnly"], `machine.disks[${i}].readOnly`),
      serial: r.string(d["serial"], `machine.disks[${i}].serial`),
      detached: bool(d["detached"], `machine.disks[${i}].detached`),
      identity: {
        path: r.string(id["path"], `${p}.path`),
        size: r.int(id["size"], `${p}.size`),
        mtimeNs: digits(id["mtimeNs"], `${p}.mtimeNs`),
        ino: digits(id["ino"], `${p}.ino`),
        dev: digits(id["dev"], `${p}.dev`),
      },
    };
  });
  const nics = r.array(o["nics"], "machine.nics").map((x, i): SavedNic => {
    const n = r.object(x, `machine.nics[${i}]`);
    const mac = r.string(n["mac"], `machine.nics[${i}].mac`);
    if (!/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/.test(mac)) r.fail(`machine.nics[${i}].mac`, "is not a MAC address");
    // A NIC without a kind is a TAP (snapshots from before stream NICs were saved).
    if (n["kind"] === "stream") return { kind: "stream", name: r.string(n["name"], `machine.nics[${i}].name`), mac };
    if (n["kind"] !== undefined && n["kind"] !== "tap") r.fail(`machine.nics[${i}].kind`, "is not tap or stream");
    return {
      kind: "tap",
      tap: r.string(n["tap"], `machine.nics[${i}].tap`),
      mac,
      ...(n["hostCidr"] !== undefined ? { hostCidr: r.string(n["hostCidr"], `machine.nics[${i}].hostCidr`) } : {}),
    };
  });
  return {
    memoryBytes: r.int(o["memoryBytes"], "machine.memoryBytes", 4096),
    cpus: r.int(o["cpus"], "machine.cpus", 1, 254),
    cpuTemplate: r.string(o["cpuTemplate"], "machine.cpuTemplate"),
    hideFeatures: r.array(o["hideFeatures"], "machine.hideFeatures").map((x, i) => r.string(x, `machine.hideFeatures[${i}]`)),
    irqchip: bool(o["irqchip"], "machine.irqchip"),
    // Snapshots from before virtio-rng have no field: they had no such device.
    rng: o["rng"] === undefined ? false : bool(o["rng"], "machine.rng"),
    bootDescription: r.string(o["bootDescription"], "machine.bootDescription"),
    ...(o["cmdline"] !== undefined ? { cmdline: r.string(o["cmdline"], "machine.cmdline") } : {}),
    disks,
    nics,
    // Snapshots from before shares were saved had none.
    shares: (o["shares"] === undefined ? [] : r.array(o["shares"], "machine.shares")).map((x, i): SavedShare => ({
      tag: r.string(r.object(x, `machine.shares[${i}]`)["tag"], `machine.shares[${i}].tag`),
    })),
  };
}

const QUEUE_FIELDS = ["nextAvail", "nextUsed", "signalled", "usedFlags"] as const;

export function encodeDevices(d: SavedDevices): Json {
  const buffers: { [name: string]: Json } = {};
  for (const [name, bytes] of d.buffers) buffers[name] = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("base64");
  return {
    buffers,
    queues: d.queues.map((qs) => (qs === undefined ? null : qs.map((q) => (q === undefined ? null : QUEUE_FIELDS.map((f) => q[f]))))),
  };
}

export function decodeDevices(r: Reader, v: unknown): SavedDevices {
  const o = r.object(v, "devices");
  const buffers = new Map<string, Uint8Array>();
  for (const [name, b] of Object.entries(r.object(o["buffers"], "devices.buffers"))) {
    buffers.set(name, r.bytes(b, `devices.buffers.${name}`));
  }
  const queues = r.array(o["queues"], "devices.queues").map((qs, i) => {
    if (qs === null) return undefined;
    return r.array(qs, `devices.queues[${i}]`).map((q, j): VirtqueueState | undefined => {
      if (q === null) return undefined;
      const path = `devices.queues[${i}][${j}]`;
      const f = r.array(q, path);
      if (f.length !== QUEUE_FIELDS.length) r.fail(path, `is not ${QUEUE_FIELDS.length} numbers`);
      return {
        nextAvail: r.int(f[0], `${path}[0]`, 0, 0xffff),
        nextUsed: r.int(f[1], `${path}[1]`, 0, 0xffff),
        signalled: r.int(f[2], `${path}[2]`, -1, 0xffff),
        usedFlags: r.int(f[3], `${path}[3]`, 0, 0xffff),
      };
    });
  });
  return { buffers, queues };
}

/**
 * Copy saved buffers into a freshly made device set's: every name must be there with the
 * same size (same machine, same tskvm), else the snapshot is not this machine's.
 */
export function restoreBuffers(dir: string, saved: ReadonlyMap<string, Uint8Array>, fresh: readonly [string, SharedArrayBuffer][]): void {
  const names = new Set(fresh.map(([n]) => n));
  for (const name of saved.keys()) {
    if (!names.has(name)) throw new SnapshotError("corrupted", `snapshot ${dir} is corrupted: it has state for a device this machine lacks (${name})`);
  }
  for (const [name, buffer] of fresh) {
    const bytes = saved.get(name);
    if (bytes === undefined) throw new SnapshotError("corrupted", `snapshot ${dir} is corrupted: it has no state for device ${name}`);
    if (bytes.byteLength !== buffer.byteLength) {
      throw new SnapshotError("corrupted", `snapshot ${dir} is corrupted: device ${name} has ${bytes.byteLength} bytes of state, this machine's has ${buffer.byteLength}`);
    }
  }
  for (const [name, buffer] of fresh) new Uint8Array(buffer).set(saved.get(name)!);
}

/** Copies of every buffer's bytes (taken while the VM is paused). */
export function copyBuffers(fresh: readonly [string, SharedArrayBuffer][]): Map<string, Uint8Array> {
  return new Map(fresh.map(([name, b]) => [name, new Uint8Array(b).slice()]));
}

/** A MAC as the snapshot writes it: "52:54:00:12:34:56". */
export function macText(mac: Uint8Array): string {
  return [...mac].map((b) => b.toString(16).padStart(2, "0")).join(":");
}

/** The bytes of a MAC that decodeMachine has checked. */
export function macBytes(text: string): Uint8Array {
  return Uint8Array.from(text.split(":").map((h) => parseInt(h, 16)));
}
