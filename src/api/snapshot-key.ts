/**
 * The key under which `tskvm run --snapshot DIR` keeps the snapshot for one set of boot
 * options: DIR/<key>/. Two runs share a snapshot exactly when they would boot the same
 * machine: the same kernel and initrd files, command line, memory, vCPUs, CPU template and
 * the same devices (their number and guest-visible options), on the same kind of host, by
 * the same tskvm.
 *
 * Files are identified by what the file system says about them (real path, size,
 * modification time in ns, inode, device), not by their contents: hashing a kernel and an
 * initrd on every run would cost tens of ms of the warm run, and any rebuild of either
 * changes its modification time. A disk image's path and contents are not part of the key:
 * a test disk is per-run input, attached afresh to the restored guest (docs/snapshot.md).
 */
import { createHash } from "node:crypto";
import { fileIdentity } from "../host/file-identity";

export interface SnapshotKeyInput {
  tskvmVersion: string;
  /** Facts that make a snapshot usable only on this kind of host (KVM kind, CPU, ...). */
  host: unknown;
  kernel: string;
  initrd: string | undefined;
  /** A distribution kernel's module directory whose drivers are appended to the initrd (VmOptions.modules). */
  modules?: string | undefined;
  cmdline: string;
  memoryBytes: number;
  cpus: number;
  cpuTemplate: string | undefined;
  hideCpuFeatures: readonly string[];
  entry: string | undefined;
  agent: boolean;
  /** A virtio-rng device. */
  rng: boolean;
  /** Per disk, in order: what the guest sees of it besides its contents. */
  disks: readonly { readOnly: boolean; serial?: string }[];
  /** Per network interface, in order: its kind and guest-visible options. */
  nics: readonly Record<string, unknown>[];
  /** Other devices (shares, ...) by kind, with their guest-visible options. */
  other?: Record<string, unknown>;
}

/** Sorted-key JSON, so that the key does not depend on property order. */
function canonical(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonical).join(",")}]`;
  if (v !== null && typeof v === "object") {
    const entries = Object.entries(v as Record<string, unknown>).filter(([, x]) => x !== undefined);
    entries.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, x]) => `${JSON.stringify(k)}:${canonical(x)}`).join(",")}}`;
  }
  return JSON.stringify(v ?? null);
}

/** 20 hex digits of SHA-256 over the options and the identities of the boot files. */
export function snapshotKey(input: SnapshotKeyInput): string {
  const files = {
    kernel: fileIdentity(input.kernel),
    initrd: input.initrd === undefined ? null : fileIdentity(input.initrd),
  };
  const text = canonical({ ...input, kernel: undefined, initrd: undefined, files });
  return createHash("sha256").update(text).digest("hex").slice(0, 20);
}
