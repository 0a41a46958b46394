/**
 * A directory of snapshots keyed by boot options (`tskvm run --snapshot DIR`): the first
 * run with a set of options boots and leaves a snapshot in DIR/<key>, every later one
 * restores it. The snapshot itself is never modified: each run starts from the same state.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import { Kvm } from "../kvm/kvm";
import { collectHostFacts, cpuFeatureWords } from "../vmm/snapshot/host-facts";
import { STATE_FILE } from "../vmm/snapshot/format";
import { type CheckedOptions, checkBeforeStart, checkKvmBeforeStart, checkOptions, resolveBootFiles, toStartError } from "./start";
import { type SnapshotKeyInput, snapshotKey } from "./snapshot-key";
import { formatMac } from "./option-values";
import { formatForward } from "../host/passt";
import { TSKVM_VERSION } from "./version";
import { VmStartError } from "./errors";
import type { VmOptions } from "./types";

export interface SnapshotCacheEntry {
  /** The snapshot directory for these options: DIR/<key>. */
  dir: string;
  /** A snapshot is there (restore it); otherwise boot and write one there. */
  exists: boolean;
}

/**
 * What the snapshot depends on of this host: the KVM kind, its capabilities, the CPU and
 * the features KVM offers. A host that differs gets its own key (a fresh snapshot) instead
 * of a snapshot it cannot run.
 */
function hostKey(kvmPath: string | undefined): unknown {
  const kvm = Kvm.open(kvmPath);
  try {
    const f = collectHostFacts(kvm);
    return { kvmKind: f.kvmKind, apiVersion: f.apiVersion, caps: f.caps, cpuVendor: f.cpuVendor, cpuSignature: f.cpuSignature, features: cpuFeatureWords(f.supportedCpuid), msrs: f.msrIndexList };
  } finally {
    kvm.close();
  }
}

/**
 * What the key takes of the devices: each disk's, NIC's and share's guest-visible options,
 * never a disk image's or a shared directory's path or contents (per-run input: a restore
 * attaches them as they are then). A share's host path is its mount path in the guest.
 */
export function deviceKey(checked: Pick<CheckedOptions, "disks" | "nics" | "userNet" | "shares">): Pick<SnapshotKeyInput, "disks" | "nics" | "other"> {
  return {
    disks: checked.disks.map((d) => ({ readOnly: d.readOnly, ...(d.serial !== undefined ? { serial: d.serial } : {}) })),
    nics: [
      ...checked.nics.map((n) => ({ kind: "tap", tap: n.tap, ...(n.mac !== undefined ? { mac: formatMac(n.mac) } : {}), ...(n.hostCidr !== undefined ? { hostCidr: n.hostCidr } : {}) })),
      ...(checked.userNet === undefined ? [] : [{ kind: "user", forwards: checked.userNet.forwards.map(formatForward), sshForward: checked.userNet.sshForward }]),
    ],
    // Only with shares: the keys of VMs without any stay what they were.
    ...(checked.shares.length > 0 ? { other: { shares: checked.shares.map((s) => ({ tag: s.tag, mountPath: s.hostPath, readOnly: s.readOnly })) } } : {}),
  };
}

/**
 * Where the snapshot for `options` lives in `cacheDir`, and whether it is there. The options
 * must have the agent on (the default): the snapshot is taken once it is ready. A VM with
 * shares must boot with them unmounted (mountShares: false; the key assumes it): a snapshot
 * holds shares only while the guest has not used them, and the run mounts them afterwards.
 * Throws VmStartError like startVm for bad options or files.
 */
export function snapshotCacheEntry(options: VmOptions, cacheDir: string): SnapshotCacheEntry {
  try {
    if (options.agent === false) throw new VmStartError("options", "a snapshot cache needs the guest agent (agent: true)");
    if (options.restore !== undefined) throw new VmStartError("options", "a snapshot cache chooses the snapshot itself: leave out restore", { option: "restore" });
    // The host's root is served by virtiofsd from boot: its FUSE session cannot be saved.
    if (options.rootfs !== undefined) {
      throw new VmStartError("options", (n) => `a snapshot cache cannot keep a VM on the host's root file system (${n("rootfs")} host: virtiofsd serves it from boot): share directories with ${n("shares")} instead`, { option: "rootfs" });
    }
    const checked = checkOptions({ ...options, mountShares: false });
    // resolveBootFiles may build the default guest (minutes): what can fail fast does first.
    checkBeforeStart(options, checked);
    checkKvmBeforeStart(options, checked);
    const files = resolveBootFiles(options, checked.agent);
    const key = snapshotKey({
      tskvmVersion: TSKVM_VERSION,
      host: hostKey(options.kvmPath),
      kernel: files.kernelPath,
      initrd: files.initrdPath,
      modules: options.modules,
      cmdline: [files.cmdline.trim(), ...checked.extraArgs].filter((a) => a !== "").join(" "),
      memoryBytes: checked.memoryBytes,
      cpus: checked.cpus,
      cpuTemplate: options.cpuTemplate,
      hideCpuFeatures: options.hideCpuFeatures ?? [],
      entry: options.entry,
      agent: checked.agent,
      rng: checked.rng,
      ...deviceKey(checked),
    });
    const dir = join(cacheDir, key);
    return { dir, exists: existsSync(join(dir, STATE_FILE)) };
  } catch (e) {
    throw toStartError(e);
  }
}
