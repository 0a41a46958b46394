/**
 * Typed handles over the three KVM file descriptors: the system (/dev/kvm), a VM, a vCPU.
 * Mirrors rust-vmm's kvm-ioctls (Kvm, VmFd, VcpuFd). Every ioctl goes through the sys layer,
 * so a failure is a SysError naming the ioctl and the errno.
 */
import { existsSync } from "node:fs";
import * as sys from "../sys/libc";
import {
  Cap,
  CapName,
  Ioctl,
  IoctlName,
  KVM_API_VERSION,
  KVM_IOEVENTFD_FLAG_DATAMATCH,
  KVM_IOEVENTFD_FLAG_DEASSIGN,
  KVM_IOEVENTFD_FLAG_PIO,
  KVM_IRQFD_FLAG_DEASSIGN,
  KVM_IRQFD_FLAG_RESAMPLE,
  KVM_PIT_SPEAKER_DUMMY,
  KvmCpuid2,
  KvmCpuidEntry2,
  KvmIoeventfd,
  KvmIrqLevel,
  KvmIrqfd,
  KvmMsi,
  KvmCoalescedMmioZone,
  KvmPitConfig,
  KvmUserspaceMemoryRegion,
} from "./abi";
import type { CpuidEntry } from "./cpuid";

/** KVM cannot be used on this host: missing device, permission, API or capability. */
export class KvmUnavailableError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "KvmUnavailableError";
  }
}

export const DEFAULT_KVM_PATH = "/dev/kvm";

/** The KVM device to open: $TSKVM_KVM_DEVICE when set (tests, unusual hosts), else /dev/kvm. */
export function kvmDevicePath(): string {
  return process.env.TSKVM_KVM_DEVICE || DEFAULT_KVM_PATH;
}

/** Capabilities tskvm cannot run without, with why each is needed. */
export const REQUIRED_CAPS: readonly [CapName, string][] = [
  ["USER_MEMORY", "guest RAM from user memory"],
  ["SET_TSS_ADDR", "x86 real-mode support"],
  ["EXT_CPUID", "CPUID configuration"],
  ["IRQCHIP", "in-kernel interrupt controllers"],
  ["PIT2", "in-kernel timer"],
  ["IOEVENTFD", "queue notifications without exits"],
  ["IRQFD", "interrupts from device threads"],
  ["MP_STATE", "SMP start-up"],
  ["IMMEDIATE_EXIT", "stopping vCPUs cleanly"],
];

/** "KVM_<name>" for error messages, made once rather than on every call. */
const IOCTL_LABEL = Object.fromEntries(Object.keys(Ioctl).map((n) => [n, `KVM_${n}`])) as Record<IoctlName, string>;

function ioctlCall(fd: number, name: IoctlName, arg: Uint8Array | null): number {
  return sys.ioctl(fd, Ioctl[name], arg, IOCTL_LABEL[name]);
}

function ioctlValueCall(fd: number, name: IoctlName, value: number): number {
  return sys.ioctlValue(fd, Ioctl[name], value, IOCTL_LABEL[name]);
}

export class Kvm {
  private constructor(readonly fd: number, readonly path: string) {}

  /** Open /dev/kvm with a message a user can act on when that is not possible. */
  static open(path = kvmDevicePath()): Kvm {
    if (!existsSync(path)) {
      throw new KvmUnavailableError(
        `${path} does not exist: this host has no KVM (enable virtualization, load kvm_intel or kvm_amd, or run on a host with KVM)`,
      );
    }
    let fd: number;
    try {
      fd = sys.open(path, sys.O_RDWR);
    } catch (e) {
      if (e instanceof sys.SysError && (e.code === "EACCES" || e.code === "EPERM")) {
        throw new KvmUnavailableError(
          `no permission to open ${path}: add your user to the 'kvm' group (sudo usermod -aG kvm $USER, then log in again) or run as root`,
        );
      }
      throw new KvmUnavailableError(`cannot open ${path}: ${(e as Error).message}`);
    }
    const kvm = new Kvm(fd, path);
    let version: number;
    try {
      version = kvm.apiVersion();
    } catch (e) {
      kvm.close();
      // ENOTTY, EINVAL: a file or another device (TSKVM_KVM_DEVICE=/dev/null, a regular file).
      if (e instanceof sys.SysError) throw new KvmUnavailableError(`${path} is not a KVM device (KVM_GET_API_VERSION: ${e.code})`);
      throw e;
    }
    if (version !== KVM_API_VERSION) {
      kvm.close();
      throw new KvmUnavailableError(`${path} speaks KVM API ${version}; tskvm needs API ${KVM_API_VERSION}`);
    }
    return kvm;
  }

  close(): void {
    sys.close(this.fd);
  }

  apiVersion(): number {
    return ioctlValueCall(this.fd, "GET_API_VERSION", 0);
  }

  /** KVM_CHECK_EXTENSION: 0 when absent, otherwise a capability-specific value (often 1). */
  checkExtension(cap: CapName): number {
    return ioctlValueCall(this.fd, "CHECK_EXTENSION", Cap[cap]);
  }

  /** Throw naming every missing capability tskvm needs. */
  requireCapabilities(caps: readonly [CapName, string][] = REQUIRED_CAPS): void {
    const missing = caps.filter(([cap]) => this.checkExtension(cap) <= 0);
    if (missing.length > 0) {
      const list = missing.map(([cap, why]) => `KVM_CAP_${cap} (${why})`).join(", ");
      throw new KvmUnavailableError(`this host's KVM lacks ${list}; tskvm cannot run here`);
    }
  }

  vcpuMmapSize(): number {
    return ioctlValueCall(this.fd, "GET_VCPU_MMAP_SIZE", 0);
  }

  /** The number of vCPUs KVM recommends per VM (KVM_CAP_NR_VCPUS), and its hard limit. */
  vcpuLimits(): { recommended: number; max: number } {
    const recommended = this.checkExtension("NR_VCPUS") || 4;
    const max = this.checkExtension("MAX_VCPUS") || recommended;
    return { recommended, max };
  }

  /** KVM_GET_SUPPORTED_CPUID, growing the buffer until KVM stops answering E2BIG. */
  supportedCpuid(): CpuidEntry[] {
    for (let capacity = 64; capacity <= 4096; capacity *= 2) {
      const buf = new Uint8Array(KvmCpuid2.size + capacity * KvmCpuidEntry2.size);
      const dv = new DataView(buf.buffer);
      dv.setUint32(KvmCpuid2.nent, capacity, true);
      try {
        ioctlCall(this.fd, "GET_SUPPORTED_CPUID", buf);
      } catch (e) {
        if (e instanceof sys.SysError && e.code === "E2BIG") continue;
        throw e;
      }
      return decodeCpuidEntries(dv, dv.getUint32(KvmCpuid2.nent, true));
    }
    throw new KvmUnavailableError("KVM_GET_SUPPORTED_CPUID returned more than 4096 entries");
  }

  createVm(): Vm {
    // Type 0: the default x86 VM.
    return new Vm(ioctlValueCall(this.fd, "CREATE_VM", 0));
  }
}

export function decodeCpuidEntries(dv: DataView, count: number): CpuidEntry[] {
  const out: CpuidEntry[] = [];
  for (let i = 0; i < count; i++) {
    const o = KvmCpuid2.entries + i * KvmCpuidEntry2.size;
    out.push({
      function: dv.getUint32(o + KvmCpuidEntry2.function, true),
      index: dv.getUint32(o + KvmCpuidEntry2.index, true),
      flags: dv.getUint32(o + KvmCpuidEntry2.flags, true),
      eax: dv.getUint32(o + KvmCpuidEntry2.eax, true),
      ebx: dv.getUint32(o + KvmCpuidEntry2.ebx, true),
      ecx: dv.getUint32(o + KvmCpuidEntry2.ecx, true),
      edx: dv.getUint32(o + KvmCpuidEntry2.edx, true),
    });
  }
  return out;
}

export function encodeCpuidEntries(entries: readonly CpuidEntry[]): Uint8Array {
  const buf = new Uint8Array(KvmCpuid2.size + entries.length * KvmCpuidEntry2.size);
  const dv = new DataView(buf.buffer);
  dv.setUint32(KvmCpuid2.nent, entries.length, true);
  entries.forEach((e, i) => {
    const o = KvmCpuid2.entries + i * KvmCpuidEntry2.size;
    dv.setUint32(o + KvmCpuidEntry2.function, e.function, true);
    dv.setUint32(o + KvmCpuidEntry2.index, e.index, true);
    dv.setUint32(o + KvmCpuidEntry2.flags, e.flags, true);
    dv.setUint32(o + KvmCpuidEntry2.eax, e.eax >>> 0, true);
    dv.setUint32(o + KvmCpuidEntry2.ebx, e.ebx >>> 0, true);
    dv.setUint32(o + KvmCpuidEntry2.ecx, e.ecx >>> 0, true);
    dv.setUint32(o + KvmCpuidEntry2.edx, e.edx >>> 0, true);
  });
  return buf;
}

export class Vm {
  constructor(readonly fd: number) {}

  close(): void {
    sys.close(this.fd);
  }

  setTssAddress(address: number): void {
    ioctlValueCall(this.fd, "SET_TSS_ADDR", address);
  }

  setIdentityMapAddress(address: number): void {
    const buf = new Uint8Array(8);
    new DataView(buf.buffer).setBigUint64(0, BigInt(address), true);
    ioctlCall(this.fd, "SET_IDENTITY_MAP_ADDR", buf);
  }

  /** In-kernel PIC pair, IOAPIC and per-vCPU LAPICs. Must come before vCPUs are created. */
  createIrqchip(): void {
    ioctlCall(this.fd, "CREATE_IRQCHIP", null);
  }

  /** In-kernel i8254 PIT (ports 0x40-0x43); the speaker port 0x61 stays a dummy in-kernel. */
  createPit(): void {
    const buf = new Uint8Array(KvmPitConfig.size);
    new DataView(buf.buffer).setUint32(KvmPitConfig.flags, KVM_PIT_SPEAKER_DUMMY, true);
    ioctlCall(this.fd, "CREATE_PIT2", buf);
  }

  setMemoryRegion(slot: number, guestAddress: number, size: number, hostAddress: bigint, flags = 0): void {
    const buf = new Uint8Array(KvmUserspaceMemoryRegion.size);
    const dv = new DataView(buf.buffer);
    dv.setUint32(KvmUserspaceMemoryRegion.slot, slot, true);
    dv.setUint32(KvmUserspaceMemoryRegion.flags, flags, true);
    dv.setBigUint64(KvmUserspaceMemoryRegion.guest_phys_addr, BigInt(guestAddress), true);
    dv.setBigUint64(KvmUserspaceMemoryRegion.memory_size, BigInt(size), true);
    dv.setBigUint64(KvmUserspaceMemoryRegion.userspace_addr, hostAddress, true);
    ioctlCall(this.fd, "SET_USER_MEMORY_REGION", buf);
  }

  createVcpu(id: number): number {
    return ioctlValueCall(this.fd, "CREATE_VCPU", id);
  }

  /** Drive an irqchip input (GSI) to a level. */
  setIrqLine(irq: number, level: boolean): void {
    setIrqLine(this.fd, irq, level);
  }

  /** Route writes to `eventFd` into interrupt `gsi` (and, for level lines, EOIs into resampleFd). */
  assignIrqfd(eventFd: number, gsi: number, resampleFd?: number): void {
    const buf = new Uint8Array(KvmIrqfd.size);
    const dv = new DataView(buf.buffer);
    dv.setUint32(KvmIrqfd.fd, eventFd, true);
    dv.setUint32(KvmIrqfd.gsi, gsi, true);
    if (resampleFd !== undefined) {
      dv.setUint32(KvmIrqfd.flags, KVM_IRQFD_FLAG_RESAMPLE, true);
      dv.setUint32(KvmIrqfd.resamplefd, resampleFd, true);
    }
    ioctlCall(this.fd, "IRQFD", buf);
  }

  deassignIrqfd(eventFd: number, gsi: number): void {
    const buf = new Uint8Array(KvmIrqfd.size);
    const dv = new DataView(buf.buffer);
    dv.setUint32(KvmIrqfd.fd, eventFd, true);
    dv.setUint32(KvmIrqfd.gsi, gsi, true);
    dv.setUint32(KvmIrqfd.flags, KVM_IRQFD_FLAG_DEASSIGN, true);
    ioctlCall(this.fd, "IRQFD", buf);
  }

  /**
   * Make a guest write to `address` (a port when `pio`) signal `eventFd` inside the kernel,
   * with no exit to user space. `datamatch` limits it to writes of that value.
   */
  ioeventfd(
    eventFd: number,
    address: number,
    opts: { length?: number; pio?: boolean; datamatch?: number; deassign?: boolean } = {},
  ): void {
    const buf = new Uint8Array(KvmIoeventfd.size);
    const dv = new DataView(buf.buffer);
    let flags = 0;
    if (opts.pio === true) flags |= KVM_IOEVENTFD_FLAG_PIO;
    if (opts.datamatch !== undefined) {
      flags |= KVM_IOEVENTFD_FLAG_DATAMATCH;
      dv.setBigUint64(KvmIoeventfd.datamatch, BigInt(opts.datamatch), true);
    }
    if (opts.deassign === true) flags |= KVM_IOEVENTFD_FLAG_DEASSIGN;
    dv.setBigUint64(KvmIoeventfd.addr, BigInt(address), true);
    dv.setUint32(KvmIoeventfd.len, opts.length ?? 0, true);
    dv.setInt32(KvmIoeventfd.fd, eventFd, true);
    dv.setUint32(KvmIoeventfd.flags, flags, true);
    ioctlCall(this.fd, "IOEVENTFD", buf);
  }

  /**
   * KVM_SET_GSI_ROUTING: replace the whole GSI routing table with `table` (an encoded struct
   * kvm_irq_routing; see gsi-routing.ts, which keeps the irqchip's own routes in it).
   */
  setGsiRouting(table: Uint8Array): void {
    ioctlCall(this.fd, "SET_GSI_ROUTING", table);
  }

  /**
   * Have KVM keep guest writes to ports [port, port + length) in the coalesced ring instead
   * of exiting for each (KVM_CAP_COALESCED_PIO), or (enabled false) stop that.
   */
  coalescePio(port: number, length: number, enabled: boolean): void {
    const buf = new Uint8Array(KvmCoalescedMmioZone.size);
    const dv = new DataView(buf.buffer);
    dv.setBigUint64(KvmCoalescedMmioZone.addr, BigInt(port), true);
    dv.setUint32(KvmCoalescedMmioZone.size_, length, true);
    dv.setUint32(KvmCoalescedMmioZone.pio, 1, true);
    ioctlCall(this.fd, enabled ? "REGISTER_COALESCED_MMIO" : "UNREGISTER_COALESCED_MMIO", buf);
  }

  signalMsi(addressLo: number, addressHi: number, data: number): void {
    // One struct kvm_msi per thread, filled in place: an interrupt allocates nothing.
    msiView.setUint32(KvmMsi.address_lo, addressLo >>> 0, true);
    msiView.setUint32(KvmMsi.address_hi, addressHi >>> 0, true);
    msiView.setUint32(KvmMsi.data, data >>> 0, true);
    ioctlCall(this.fd, "SIGNAL_MSI", msiBuf);
  }
}

/** KVM_SIGNAL_MSI's argument; per thread, as this module is loaded once per worker. */
const msiBuf = new Uint8Array(KvmMsi.size);
const msiView = new DataView(msiBuf.buffer);

/**
 * KVM_IRQ_LINE on a VM fd, usable from any thread (device models in vCPU workers hold only
 * the fd number). The buffer is per thread: this module is loaded once per worker.
 */
const irqLevelBuf = new Uint8Array(KvmIrqLevel.size);
const irqLevelView = new DataView(irqLevelBuf.buffer);
export function setIrqLine(vmFd: number, irq: number, level: boolean): void {
  irqLevelView.setUint32(KvmIrqLevel.irq, irq, true);
  irqLevelView.setUint32(KvmIrqLevel.level, level ? 1 : 0, true);
  sys.ioctl(vmFd, Ioctl.IRQ_LINE, irqLevelBuf, "KVM_IRQ_LINE");
}
