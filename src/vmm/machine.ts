/**
 * A virtual machine: KVM VM, guest RAM, boot state, devices and one worker thread per vCPU,
 * wired together. The main thread keeps the control plane (input, stop, lifecycle); vCPU
 * workers run KVM_RUN and handle exits over shared device state.
 */
import {
  KVM_IDENTITY_MAP_ADDR,
  KVM_TSS_ADDR,
  MIN_GUEST_MEMORY,
  ramLayout,
} from "../arch/x86/layout";
import type { BootCpuState } from "../arch/x86/cpu-state";
import { Kvm, KvmUnavailableError, Vm } from "../kvm/kvm";
import { KVM_COALESCED_MMIO_PAGE_OFFSET } from "../kvm/abi";
import { Vcpu } from "../kvm/vcpu";
import { allowedXcr0, linuxHidingArgs, resolveHiddenFeatures, vcpuCpuid, CPU_TEMPLATES, CpuidEntry } from "../kvm/cpuid";
import { setXcr0 } from "../kvm/xcr";
import { maxMpTableCpus } from "../arch/x86/mptable";
import * as sys from "../sys/libc";
import { openDiskImage, type DiskImage } from "../host/disk-image";
import { VirtioPciTransport } from "../devices/virtio/pci-transport";
import { defaultSerial } from "../devices/virtio/blk/device";
import { fsDescription } from "../devices/virtio/fs/device";
import type { PciSlot } from "../devices/pci/types";
import { IoThread, createIoControl } from "../io/io-thread";
import { describeVirtioDevice, type FsSpec, type VirtioDeviceSpec, type VirtioFunctionSpec } from "../board/virtio-devices";
import { openTap, configureHostSide, type Tap } from "../host/tap";
import type { BackendInfo } from "../host/vhost-user/frontend";
import { defaultMac } from "../devices/virtio/net/device";
import { probeOffloads } from "../devices/virtio/net/backend";
import { detectHostKvm, defaultCpuTemplate } from "../kvm/host";
import { GuestMemory } from "../memory/guest-memory";
import { ConfigError } from "./errors";
import { createDeviceSetSpec, instantiateDevices, DeviceSet, DeviceSetSpec, type SerialSinkSpec } from "../board/devices";
import type { Serial } from "../devices/legacy/serial";
import { createHaltStatus, createRunControl, RunControlCell, ExitCounters, VcpuStop } from "../vcpu/exit-loop";
import { PrestartedWorker, VcpuThread, VcpuThreadResult, holdKickHandler, prestartVcpuWorker } from "../vcpu/vcpu-thread";
import { applyBootMsrs, configureLapicForBoot } from "./cpu-setup";
import { prepareBoot, BootSource } from "./boot-source";
import { VirtioPciDeviceSide } from "../devices/virtio/pci-device-side";
import { BlkConfig } from "../devices/virtio/blk/device";
import { SECTOR_SIZE } from "../devices/virtio/blk/request";
import { deviceSetBuffers, registerRestoredIoeventfds } from "../board/devices";
import { identityChange, openFileIdentity } from "../host/file-identity";
import type { QueueStates } from "../io/io-thread";
import { RamFileError, mapRamFile, readRamFileInto, writeRamFile } from "../memory/ram-file";
import { kvmclockStopped, msrIndexList, restoreVcpuState, saveVcpuState, setTscKhz, getTscKhz, vcpuStateSupport, type VcpuState } from "../kvm/vcpu-state";
import { adjustClockSupported, restoreVmState, saveVmState } from "../kvm/vm-state";
import { Reader, SnapshotError, writeSnapshotDir, type Json, type ReadSnapshot, type WrittenSnapshot } from "./snapshot/format";
import { checkHostFacts, collectHostFacts, hostXsaveSize } from "./snapshot/host-facts";
import {
  copyBuffers,
  decodeDevices,
  decodeMachine,
  encodeDevices,
  encodeMachine,
  macBytes,
  macText,
  restoreBuffers,
  type SavedDevices,
  type SavedMachine,
} from "./snapshot/machine-state";
import { chooseIoEngine, type IoEngine, type IoEngineChoice } from "../host/io-engine";
import { mergeExitStats, type ExitStatsData } from "../vcpu/exit-stats";
import { performance } from "node:perf_hooks";

export interface MachineConfig {
  /** Guest RAM in bytes. */
  memoryBytes: number;
  cpus: number;
  boot: BootSource;
  /** Where the serial console's output goes (a file descriptor). */
  consoleFd: number;
  /**
   * Write the console's output to consoleFd as [tag, byte] pairs instead of raw bytes, so
   * that it can share one pipe with the other UARTs' output (SerialSinkSpec).
   */
  consoleTag?: number;
  /**
   * Where COM2, COM3 and COM4 (the guest's ttyS1..ttyS3) send their output, in that order.
   * The UARTs are always there; one without a sink drops what the guest writes to it.
   * tskvm's guest agent uses them as its control channel and for command output (src/api).
   */
  auxSerialSinks?: readonly (SerialSinkSpec | undefined)[];
  /** "host", "emulated", or undefined for the host's default. */
  cpuTemplate?: string;
  /** Extra CPU features to hide (names as in /proc/cpuinfo). */
  hideFeatures?: readonly string[];
  /** In-kernel irqchip and PIT (default true). Tiny test guests turn it off to see HLT exits. */
  irqchip?: boolean;
  kvmPath?: string;
  /**
   * How virtio back ends reach the host: "io_uring" (a queue drain per system call),
   * "sync" (a system call per request or frame), or "auto" (default): io_uring where this
   * process can use it. Asking for io_uring where it cannot be used is an IoEngineError.
   */
  ioEngine?: IoEngineChoice;
  /** virtio-blk disks, in order: /dev/vda, /dev/vdb, ... */
  disks?: readonly DiskConfig[];
  /** virtio-net interfaces on TAP devices or stream sockets, in order: eth0, eth1, ... */
  nics?: readonly NicConfig[];
  /**
   * virtio-fs devices, each served by a virtiofsd that is running and negotiated
   * (host/virtiofsd.ts). With any, guest RAM is a memfd mapped shared, which they map.
   */
  shares?: readonly ShareConfig[];
  /** A virtio-rng entropy device fed from the host's getrandom (default false). */
  rng?: boolean;
}

export interface ShareConfig {
  /** The virtio-fs tag the guest mounts it by. */
  tag: string;
  /** For messages: "virtiofsd for /home/me/tree". */
  name: string;
  /** The vhost-user connection (owned by the caller, which closes it after the machine is destroyed). */
  connFd: number;
  /** What the handshake found. */
  backend: BackendInfo;
}

/** What to rebuild a machine from: a snapshot, and where its serial ports go now. */
export interface MachineRestoreConfig {
  /** A snapshot read and checked by readSnapshotDir (vmm/snapshot/format.ts). */
  snapshot: ReadSnapshot;
  consoleFd: number;
  consoleTag?: number;
  auxSerialSinks?: readonly (SerialSinkSpec | undefined)[];
  kvmPath?: string;
  /**
   * Disk images to attach in place of the snapshot's, by disk (undefined: the snapshot's
   * path). A detached disk (a per-run disk) may be any image; another must be the file the
   * snapshot saw, unchanged.
   */
  diskPaths?: readonly (string | undefined)[];
  /**
   * One per share the snapshot has, in order and with the same tags: a virtiofsd started
   * and negotiated anew, on the host directory as it is now (a snapshot holds shares only
   * while the guest had not used them, so nothing of the old virtiofsd is needed).
   */
  shares?: readonly ShareConfig[];
  /** One per stream NIC the snapshot has, in order: a connected socket of a fresh back end (passt). */
  streams?: readonly StreamNicConfig["stream"][];
}

/** What the machine booted, for messages. */
export interface MachineBootInfo {
  /** e.g. "bzImage, 64-bit entry at 0x100200", or what a restored machine had booted. */
  description: string;
  /** The kernel command line as passed (Linux boots only). */
  cmdline?: string;
  /** The snapshot directory a restored machine came from. */
  restoredFrom?: string;
}

/** How to continue after building the devices: boot something, or take a snapshot's state. */
type MachineSource = { kind: "boot"; boot: BootSource } | { kind: "restore"; snapshot: ReadSnapshot; machine: SavedMachine; devices: SavedDevices; reader: Reader };

export type NicConfig = TapNicConfig | StreamNicConfig;

export interface TapNicConfig {
  /** TAP name: created (and removed on exit) unless a persistent one exists. */
  tap: string;
  /** The guest's MAC (6 bytes); default stable, derived from the TAP name. */
  mac?: Uint8Array;
  /** Bring the host end up with this address ("192.168.100.1/24"). */
  hostCidr?: string;
}

/** A NIC on a connected `-netdev stream` socket (passt's), which its owner keeps and closes. */
export interface StreamNicConfig {
  stream: {
    fd: number;
    /** For messages: "passt". */
    name: string;
    /** The owner tells the user when the peer is lost, so the device need not. */
    reportsOwnLoss?: boolean;
  };
  /** The guest's MAC (6 bytes); default stable, derived from the name. */
  mac?: Uint8Array;
}

export interface DiskConfig {
  path: string;
  readOnly: boolean;
  /** GET_ID serial (at most 20 bytes); default derived from the path. */
  serial?: string;
}

/** How often the machine checks whether the guest has halted for good, and how long it waits for answers. */
const HALT_PROBE_INTERVAL_MS = 1000;
const HALT_PROBE_ANSWER_MS = 250;

/** PCI INTx lines go to IOAPIC pins 16..23 (0..15 carry the ISA IRQs), shared round-robin. */
const PCI_GSI_BASE = 16;
const PCI_GSI_COUNT = 8;

/** Everything the machine opened for its virtio devices, for closing. */
interface VirtioResources {
  /** The I/O engine the back ends use (undefined: no virtio device). */
  ioEngine: IoEngine | undefined;
  functions: VirtioFunctionSpec[];
  fds: number[];
  images: DiskImage[];
  taps: Tap[];
  controlFd: number | undefined;
  /** What a snapshot records of each disk, NIC and share. */
  disks: { serial: string }[];
  nics: ({ kind: "tap"; tap: string; mac: Uint8Array; hostCidr?: string } | { kind: "stream"; name: string; mac: Uint8Array })[];
  shares: { tag: string }[];
}

/**
 * What the machine reports while it runs that is not how the run ends: a device's warning
 * (one line: a guest that broke its virtio device, a failing disk) or a vCPU's registers
 * (asked for with dumpRegisters).
 */
export type MachineDiagnostic = { kind: "warning"; message: string } | { kind: "registers"; vcpu: number; dump: string };

/** How a run ended, with the per-vCPU details. */
export interface MachineResult {
  /** The first stop reported (what ended the VM). */
  stop: VcpuStop;
  /** Set when the VMM itself ended the run (signal, Ctrl-A x, API call). */
  requestedBy: string | undefined;
  vcpus: VcpuThreadResult[];
  counters: ExitCounters;
  /** Exits by reason, port and MMIO address, all vCPUs together. */
  exits: ExitStatsData;
}

/** When each stage of building a machine ended, in ms from process start (performance.now()). */
export interface BuildStages {
  /** KVM opened, the VM and its irqchip created. */
  vm: number;
  /** Guest RAM mapped (for a restore: the snapshot's RAM). */
  ram: number;
  /** Virtio devices and their back ends opened. */
  devices: number;
  /** Kernel and initrd loaded, boot parameters written (a restore: nothing). */
  boot: number;
  /** vCPUs created and set up. */
  vcpus: number;
}

/** Start-up, in ms from process start (NaN for what has not happened). */
export interface MachineStartupTimeline {
  /** Node's own bootstrap was complete. */
  nodeReady: number;
  createBegin: number;
  built: BuildStages;
  createEnd: number;
  /** The boot vCPU's worker had loaded its code (it is started when the build begins). */
  bootThreadLoaded: number;
  firstKvmRun: number;
}

export class Machine {
  private threads: VcpuThread[] = [];
  private readonly control = createRunControl();
  private haltStatus: Int32Array = createHaltStatus(1);
  private haltTimer: NodeJS.Timeout | undefined;
  private firstStop: VcpuStop | undefined;
  private requestedBy: string | undefined;
  private readonly inputs: SerialInput[];
  private destroyed = false;
  private running: Promise<MachineResult> | undefined;
  readonly devices: DeviceSet;
  /** Where diagnostics go; the caller (the API) sets it before run(). Default: dropped. */
  onDiagnostic: (d: MachineDiagnostic) => void = () => undefined;

  private constructor(
    private readonly kvm: Kvm,
    readonly vm: Vm,
    readonly memory: GuestMemory,
    private readonly vcpus: Vcpu[],
    private readonly deviceSpec: DeviceSetSpec,
    readonly boot: MachineBootInfo,
    private readonly consoleFd: number,
    readonly cpuTemplate: string,
    private readonly virtio: VirtioResources,
    private readonly irqchip: boolean,
    /** What a snapshot records of the configuration (disk identities are taken at the snapshot). */
    private readonly shape: Omit<SavedMachine, "disks" | "nics" | "shares">,
    restoredQueues: (QueueStates | undefined)[] | undefined,
  ) {
    // The main thread's own view of the devices: it feeds serial input, and plays
    // firmware for PCI (BAR addresses; the first ioeventfd registrations). A restored
    // machine's devices are where the guest's driver left them.
    this.devices = instantiateDevices(deviceSpec, {
      vmFd: vm.fd,
      consoleFd,
      memory,
      control: {
        requestReset: (reason) => this.stop(reason),
        guestPanicked: (reason, now) => {
          Atomics.store(this.control, RunControlCell.PANIC, 1);
          if (!now) return;
          this.firstStop ??= { kind: "panic", reason };
          this.stopAll();
        },
      },
      warn: (message) => this.onDiagnostic({ kind: "warning", message }),
      stopping: () => Atomics.load(this.control, RunControlCell.STOP) !== 0,
      ...(virtio.controlFd !== undefined ? { ioControlFd: virtio.controlFd } : {}),
    });
    if (restoredQueues === undefined) this.devices.pci?.assignResources();
    else registerRestoredIoeventfds(vm, deviceSpec, this.devices);
    const stopped = () => Atomics.load(this.control, RunControlCell.STOP) !== 0;
    this.inputs = [this.devices.serial, ...this.devices.auxSerials].map((uart) => new SerialInput(uart, stopped));
    if (virtio.controlFd !== undefined) {
      this.io = new IoThread({
        memory: memory.describe(),
        vmFd: vm.fd,
        controlFd: virtio.controlFd,
        control: createIoControl(),
        devices: virtio.functions,
        ...(restoredQueues !== undefined ? { restoredQueues } : {}),
      });
      this.io.onWarning = (message) => this.onDiagnostic({ kind: "warning", message });
    }
  }

  private io: IoThread | undefined;

  /** Build the whole machine; nothing runs until run(). Cleans up after itself on failure. */
  static create(config: MachineConfig): Machine {
    return Machine.undoOnFailure((cleanups) => Machine.build(config, { kind: "boot", boot: config.boot }, cleanups));
  }

  /**
   * Rebuild a machine from a snapshot: the same memory (mapped copy-on-write from the
   * snapshot's RAM file), vCPUs, devices and back ends (disk images, TAPs), every KVM and
   * device state as it was; run() continues the guest where it was paused. Throws a
   * SnapshotError when this host or a disk image cannot carry the snapshot, and leaves
   * nothing behind.
   */
  static restore(config: MachineRestoreConfig): Machine {
    const snap = config.snapshot;
    const reader = new Reader(snap.dir, "not this tskvm's machine");
    const machine = decodeMachine(reader, snap.body.machine);
    const devices = decodeDevices(reader, snap.body.devices);
    const paths = config.diskPaths ?? [];
    if (paths.length > machine.disks.length) {
      throw new SnapshotError("state", `snapshot ${snap.dir} has ${machine.disks.length} disks; ${paths.length} were given`);
    }
    const shares = config.shares ?? [];
    const savedTags = machine.shares.map((sh) => sh.tag);
    if (shares.length !== savedTags.length || shares.some((sh, i) => sh.tag !== savedTags[i])) {
      const has = savedTags.length === 0 ? "no shares" : `shares ${savedTags.join(", ")}`;
      throw new SnapshotError("state", `snapshot ${snap.dir} has ${has}; ${shares.length === 0 ? "none were" : `${shares.map((sh) => sh.tag).join(", ")} were`} given`);
    }
    const streams = config.streams ?? [];
    const savedStreams = machine.nics.filter((n) => n.kind === "stream").length;
    if (streams.length !== savedStreams) {
      throw new SnapshotError("state", `snapshot ${snap.dir} has ${savedStreams} user-mode network interfaces; ${streams.length} back ends were given`);
    }
    let stream = 0;
    const shape: Omit<MachineConfig, "boot"> = {
      memoryBytes: machine.memoryBytes,
      cpus: machine.cpus,
      consoleFd: config.consoleFd,
      ...(config.consoleTag !== undefined ? { consoleTag: config.consoleTag } : {}),
      ...(config.auxSerialSinks !== undefined ? { auxSerialSinks: config.auxSerialSinks } : {}),
      cpuTemplate: machine.cpuTemplate,
      hideFeatures: machine.hideFeatures,
      irqchip: machine.irqchip,
      rng: machine.rng,
      ...(config.kvmPath !== undefined ? { kvmPath: config.kvmPath } : {}),
      disks: machine.disks.map((d, i) => ({ path: paths[i] ?? d.path, readOnly: d.readOnly, serial: d.serial })),
      nics: machine.nics.map((n): NicConfig =>
        n.kind === "stream"
          ? { stream: streams[stream++]!, mac: macBytes(n.mac) }
          : { tap: n.tap, mac: macBytes(n.mac), ...(n.hostCidr !== undefined ? { hostCidr: n.hostCidr } : {}) },
      ),
      shares,
    };
    return Machine.undoOnFailure((cleanups) => Machine.build(shape, { kind: "restore", snapshot: snap, machine, devices, reader }, cleanups));
  }

  private static undoOnFailure(build: (cleanups: (() => void)[]) => Machine): Machine {
    const cleanups: (() => void)[] = [];
    const begin = performance.now();
    try {
      const m = build(cleanups);
      m.createdAt = { begin, end: performance.now() };
      return m;
    } catch (e) {
      for (const undo of cleanups.reverse()) {
        try {
          undo();
        } catch {
          // Keep undoing the rest; the first error is the one to report.
        }
      }
      throw e;
    }
  }

  private static build(config: Omit<MachineConfig, "boot">, source: MachineSource, cleanups: (() => void)[]): Machine {
    if (config.memoryBytes < MIN_GUEST_MEMORY) {
      throw new ConfigError(`guest memory ${formatBytes(config.memoryBytes)} is too small: give at least ${formatBytes(MIN_GUEST_MEMORY)}`, "memoryBytes");
    }
    // The boot vCPU's thread starts now and loads while the machine is built (the other
    // vCPUs' threads start once it runs: they would only compete with it for the CPUs).
    const bootWorker = prestartVcpuWorker();
    cleanups.push(() => void bootWorker.worker.terminate());
    const kvm = Kvm.open(config.kvmPath);
    cleanups.push(() => kvm.close());
    const irqchip = config.irqchip ?? true;
    kvm.requireCapabilities();
    if (source.kind === "restore") {
      // Before anything is built: can this host run the saved vCPUs at all?
      const snap = source.snapshot;
      const current = collectHostFacts(kvm);
      checkHostFacts(snap.dir, snap.body.host, current, snap.body.vcpus, hostXsaveSize(current.caps));
      if (snap.body.vcpus.length !== config.cpus) throw new SnapshotError("corrupted", `snapshot ${snap.dir} is corrupted: it has ${snap.body.vcpus.length} vCPU states for ${config.cpus} vCPUs`);
    }
    const limits = kvm.vcpuLimits();
    const functionCount = (config.disks ?? []).length + (config.nics ?? []).length + (config.shares ?? []).length + (config.rng === true ? 1 : 0);
    const maxCpus = Math.min(limits.max, maxMpTableCpus(functionCount));
    if (!Number.isInteger(config.cpus) || config.cpus < 1 || config.cpus > maxCpus) {
      const why = maxCpus === limits.max ? "this host's KVM allows" : "tskvm's MP table holds";
      throw new ConfigError(`cannot give the guest ${config.cpus} vCPUs: ${why} 1 to ${maxCpus}`, "cpus");
    }
    const host = detectHostKvm();
    const templateName = config.cpuTemplate ?? defaultCpuTemplate(host.kind);
    const template = CPU_TEMPLATES[templateName];
    if (template === undefined) {
      throw new ConfigError(`unknown CPU template '${templateName}': use ${Object.keys(CPU_TEMPLATES).join(" or ")}`, "cpuTemplate");
    }
    const hidden = resolveHiddenFeatures([...template.hide, ...(config.hideFeatures ?? [])]);

    const vm = kvm.createVm();
    cleanups.push(() => vm.close());
    vm.setIdentityMapAddress(KVM_IDENTITY_MAP_ADDR);
    vm.setTssAddress(KVM_TSS_ADDR);
    if (irqchip) {
      vm.createIrqchip();
      vm.createPit();
    }
    const stages: BuildStages = { vm: performance.now(), ram: NaN, devices: NaN, boot: NaN, vcpus: NaN };

    // A restored machine's RAM is the snapshot's file, mapped copy-on-write: nothing is
    // read until the guest touches it, so the cost does not grow with the RAM size.
    const shares = config.shares ?? [];
    // RAM a vhost-user back end maps must be shared: then a memfd, with the snapshot's data
    // copied in (its data extents only, never its holes).
    const memory =
      source.kind === "restore" && shares.length === 0 ? mapSnapshotRam(source.snapshot, config.memoryBytes) : allocateMemory(config.memoryBytes, shares.length > 0);
    cleanups.push(() => memory.free());
    if (source.kind === "restore" && shares.length > 0) copySnapshotRam(source.snapshot, memory);
    memory.regions.forEach((r, slot) => vm.setMemoryRegion(slot, r.base, r.size, r.hostAddress!));
    stages.ram = performance.now();

    const virtio = openVirtioDevices(vm, memory, { disks: config.disks ?? [], nics: config.nics ?? [], shares, rng: config.rng ?? false }, irqchip, cleanups, config.ioEngine);
    if (source.kind === "restore") {
      checkDisks(source.snapshot.dir, source.machine, virtio);
      if (source.devices.queues.length !== virtio.functions.length) {
        throw new SnapshotError("corrupted", `snapshot ${source.snapshot.dir} is corrupted: it has queue state for ${source.devices.queues.length} virtio devices, the machine has ${virtio.functions.length}`);
      }
    }
    stages.devices = performance.now();
    const bootSummary =
      source.kind === "boot"
        ? prepareBoot(memory, source.boot, {
            cpus: config.cpus,
            extraCmdline: [...template.linuxArgs, ...linuxHidingArgs(hidden)],
            pciIrqs: virtio.functions.map((f) => ({ device: f.slot.device, pin: f.slot.intxPin, ioapicPin: f.slot.gsi })),
          })
        : undefined;
    stages.boot = performance.now();
    // KVM may keep COM1's THR writes in its coalesced ring (the kernel console then costs
    // one exit per character, not two): where the host has it and the vCPU mapping shows it.
    const coalescing =
      kvm.checkExtension("COALESCED_PIO") > 0 && kvm.checkExtension("COALESCED_MMIO") === KVM_COALESCED_MMIO_PAGE_OFFSET && kvm.vcpuMmapSize() >= (KVM_COALESCED_MMIO_PAGE_OFFSET + 1) * 4096;
    const deviceSpec = createDeviceSetSpec({
      memory,
      cpus: config.cpus,
      virtio: virtio.functions,
      ...(config.consoleTag !== undefined ? { consoleTag: config.consoleTag } : {}),
      ...(config.auxSerialSinks !== undefined ? { auxSinks: config.auxSerialSinks } : {}),
      coalesceConsoleTx: coalescing,
    });
    if (source.kind === "restore") restoreBuffers(source.snapshot.dir, source.devices.buffers, deviceSetBuffers(deviceSpec));

    const supported = kvm.supportedCpuid();
    const runSize = kvm.vcpuMmapSize();
    const vcpus: Vcpu[] = [];
    for (let id = 0; id < config.cpus; id++) {
      const vcpu = Vcpu.map(id, vm.createVcpu(id), runSize);
      vcpus.push(vcpu);
      cleanups.push(() => vcpu.destroy());
      if (bootSummary === undefined) continue;
      const cpuid = vcpuCpuid(supported, { apicId: id, vcpuCount: config.cpus, hidden });
      vcpu.setCpuid(cpuid);
      // XCR0 as the CPUID offers it, so that KVM's XSAVE sizes match the guest's (xcr.ts).
      if (allowedXcr0(cpuid) > 1n) setXcr0(vcpu, allowedXcr0(cpuid));
      applyBootMsrs(vcpu);
      if (irqchip) configureLapicForBoot(vcpu);
      // Application processors wait for INIT/SIPI in the in-kernel LAPIC; only the BSP
      // gets the boot state.
      if (id === 0) applyBootState(vcpu, bootSummary.cpu);
    }
    if (source.kind === "restore") restoreKvmState(source.snapshot, vm, vcpus);
    stages.vcpus = performance.now();

    const shape = {
      memoryBytes: config.memoryBytes,
      cpus: config.cpus,
      cpuTemplate: templateName,
      hideFeatures: [...(config.hideFeatures ?? [])],
      irqchip,
      rng: config.rng ?? false,
      bootDescription: source.kind === "boot" ? bootSummary!.description : source.machine.bootDescription,
      ...((source.kind === "boot" ? bootSummary!.cmdline : source.machine.cmdline) !== undefined
        ? { cmdline: (source.kind === "boot" ? bootSummary!.cmdline : source.machine.cmdline)! }
        : {}),
    };
    const bootInfo: MachineBootInfo = {
      description: shape.bootDescription,
      ...(shape.cmdline !== undefined ? { cmdline: shape.cmdline } : {}),
      ...(source.kind === "restore" ? { restoredFrom: source.snapshot.dir } : {}),
    };
    const machine = new Machine(
      kvm, vm, memory, vcpus, deviceSpec, bootInfo, config.consoleFd, templateName, virtio, irqchip, shape,
      source.kind === "restore" ? source.devices.queues : undefined,
    );
    if (source.kind === "restore") machine.attachDetachedDisks(source.machine);
    machine.bootWorker = bootWorker;
    machine.buildStages = stages;
    return machine;
  }

  private createdAt = { begin: NaN, end: NaN };
  /** When each stage of the build ended (performance.now()). */
  private buildStages: BuildStages = { vm: NaN, ram: NaN, devices: NaN, boot: NaN, vcpus: NaN };

  /**
   * Where start-up time went, in ms since this process started: until Machine.create was
   * called (Node, module loading, option handling), building the machine (KVM, RAM, kernel
   * and initrd, devices, vCPUs), and until the boot vCPU entered KVM_RUN (NaN before it has).
   */
  startupTimeline(): MachineStartupTimeline {
    return {
      nodeReady: performance.nodeTiming.bootstrapComplete,
      createBegin: this.createdAt.begin,
      built: { ...this.buildStages },
      createEnd: this.createdAt.end,
      bootThreadLoaded: this.threads[0]?.loadedAt ?? NaN,
      firstKvmRun: this.threads[0]?.firstRunAt ?? NaN,
    };
  }

  /** What sits at an I/O port or MMIO address, e.g. "COM1 (16550A) +5", for exit summaries. */
  deviceAt(space: "pio" | "mmio", address: number): string | undefined {
    const r = (space === "pio" ? this.devices.pio : this.devices.mmio).find(address);
    return r === undefined ? undefined : `${r.name} +${(address - r.base).toString(16)}`;
  }

  /** The I/O engine of the virtio back ends, and why sync if io_uring was not usable; undefined without virtio devices. */
  get ioEngine(): IoEngine | undefined {
    return this.virtio.ioEngine;
  }

  /** The boot vCPU's thread, started while the machine was built (until run() takes it). */
  private bootWorker: PrestartedWorker | undefined;

  /** Start every vCPU thread; resolves once all have stopped. */
  run(): Promise<MachineResult> {
    if (this.running !== undefined) return this.running;
    const releaseKick = holdKickHandler();
    this.haltStatus = createHaltStatus(this.vcpus.length);
    this.threads = this.vcpus.map(
      (vcpu) =>
        new VcpuThread(vcpu, {
          vcpu: vcpu.handle,
          memory: this.memory.describe(),
          devices: this.deviceSpec,
          control: this.control,
          haltStatus: this.haltStatus,
          vmFd: this.vm.fd,
          consoleFd: this.consoleFd,
          coalescing: this.deviceSpec.serial.coalesceTx === true,
          ...(this.virtio.controlFd !== undefined ? { ioControlFd: this.virtio.controlFd } : {}),
        }),
    );
    if (this.irqchip) this.startHaltProbes();
    // The boot vCPU first (in its thread started ahead), then the others, then the I/O
    // worker: nothing the guest does early needs the I/O worker, whose start would only
    // compete with the boot vCPU's.
    const bootWorker = this.bootWorker;
    this.bootWorker = undefined;
    this.threads.forEach((t, i) => {
      t.onStop = (r) => this.onVcpuStop(r);
      t.onRegisterDump = (dump) => this.onDiagnostic({ kind: "registers", vcpu: t.vcpu.id, dump });
      t.onWarning = (message) => this.onDiagnostic({ kind: "warning", message });
      t.start(i === 0 ? bootWorker : undefined);
    });
    this.io?.start();
    this.running = Promise.all(this.threads.map((t) => t.done)).then(async (results) => {
      // The back ends finish and flush only after no vCPU can submit more work.
      this.stopHaltProbes();
      await this.io?.stop();
      if (this.io?.failure !== undefined) this.onDiagnostic({ kind: "warning", message: `I/O worker failed: ${this.io.failure}` });
      releaseKick();
      this.stopInput();
      const counters: ExitCounters = { pio: 0, mmio: 0, unclaimedPio: 0, unclaimedMmio: 0, other: 0 };
      for (const r of results) {
        if (r.counters === undefined) continue;
        for (const k of Object.keys(counters) as (keyof ExitCounters)[]) counters[k] += r.counters[k];
      }
      const stop = panicked(this.firstStop ?? results[0]?.stop ?? { kind: "stopped" as const }, this.control);
      const exits = mergeExitStats(results.flatMap((r) => (r.exits === undefined ? [] : [r.exits])));
      return { stop, requestedBy: this.requestedBy, vcpus: results, counters, exits };
    });
    return this.running;
  }

  private paused: { ioQueues: (QueueStates | undefined)[] | undefined } | undefined;
  private pausing: Promise<void> | undefined;

  /** True between pause() and resume(). */
  get isPaused(): boolean {
    return this.paused !== undefined;
  }

  /**
   * Pause the guest: every vCPU out of KVM_RUN and parked (an I/O instruction in progress
   * completed first), then the I/O worker parked with every device quiesced: no request in
   * flight, every completed one on its used ring with its interrupt sent. Kicks and
   * interrupts that come meanwhile wait in their eventfds and in the irqchip. Resolves
   * when everything is parked; rejects if the VM ends first.
   */
  pause(): Promise<void> {
    if (this.paused !== undefined) return Promise.resolve();
    if (this.pausing !== undefined) return this.pausing;
    if (this.running === undefined || Atomics.load(this.control, RunControlCell.STOP) !== 0) {
      return Promise.reject(new SnapshotError("state", "the VM is not running: nothing to pause"));
    }
    this.pausing = this.parkAll().finally(() => {
      this.pausing = undefined;
    });
    return this.pausing;
  }

  private async parkAll(): Promise<void> {
    this.stopHaltProbes();
    Atomics.store(this.control, RunControlCell.PAUSE, 1);
    for (const t of this.threads) t.kick();
    const ended = this.running!.then(() => "ended" as const);
    for (;;) {
      const parked = Atomics.load(this.control, RunControlCell.PARKED);
      if (parked >= this.threads.length) break;
      const wait = waitAsync(this.control, RunControlCell.PARKED, parked);
      if (wait.async && (await Promise.race([wait.value, ended])) === "ended") {
        throw new SnapshotError("state", "the VM ended while it was being paused");
      }
    }
    const ioQueues = this.io === undefined ? undefined : await this.io.pause();
    if (Atomics.load(this.control, RunControlCell.STOP) !== 0) throw new SnapshotError("state", "the VM ended while it was being paused");
    // The guest's time goes on while it is paused: tell a kvmclock guest, so that its
    // soft-lockup watchdog does not take the gap for a hung CPU (as QEMU does on "stop").
    for (const v of this.vcpus) kvmclockStopped(v);
    this.paused = { ioQueues };
  }

  /** Let a paused guest go on: the I/O worker first (it serves what waited), then the vCPUs. */
  resume(): void {
    if (this.paused === undefined) return;
    this.paused = undefined;
    this.io?.resume();
    Atomics.store(this.control, RunControlCell.PAUSE, 0);
    Atomics.notify(this.control, RunControlCell.PAUSE);
    if (this.irqchip && Atomics.load(this.control, RunControlCell.STOP) === 0) this.startHaltProbes();
  }

  /**
   * Write a snapshot of the paused machine into `dir` (which must not exist yet): every
   * vCPU's and the VM's KVM state, every device's state, the configuration to rebuild the
   * machine, and guest RAM (sparse). `detachedDisks[i]` says the guest holds nothing of disk
   * i (not mounted, caches dropped), so a restore may attach another image in its place.
   * The machine stays paused. Throws SnapshotError: "state" when not paused, "unwritable"
   * when `dir` cannot be written (nothing is left behind).
   */
  snapshot(dir: string, opts: { tskvmVersion: string; detachedDisks?: readonly boolean[]; annotations?: Json }): WrittenSnapshot {
    const paused = this.paused;
    if (paused === undefined) throw new SnapshotError("state", "the VM must be paused for a snapshot");
    this.checkSharesUnused(paused.ioQueues);
    const support = vcpuStateSupport(this.vm);
    const msrIndices = msrIndexList(this.kvm);
    // VM state after the vCPUs': KVM_GET_MP_STATE may move pending LAPIC events first.
    const vcpus: VcpuState[] = this.vcpus.map((v) => saveVcpuState(v, { support, msrIndices, irqchip: this.irqchip }));
    const vmState = saveVmState(this.vm, { irqchip: this.irqchip, clock: adjustClockSupported(this.vm) });
    const saved: SavedMachine = {
      ...this.shape,
      disks: this.virtio.images.map((image, i) => ({
        path: image.path,
        readOnly: image.readOnly,
        serial: this.virtio.disks[i]!.serial,
        identity: openFileIdentity(image.fd, image.path),
        detached: opts.detachedDisks?.[i] ?? false,
      })),
      nics: this.virtio.nics.map((n) =>
        n.kind === "stream"
          ? { kind: "stream" as const, name: n.name, mac: macText(n.mac) }
          : { kind: "tap" as const, tap: n.tap, mac: macText(n.mac), ...(n.hostCidr !== undefined ? { hostCidr: n.hostCidr } : {}) },
      ),
      shares: this.virtio.shares.map((sh) => ({ tag: sh.tag })),
    };
    const devices: SavedDevices = {
      buffers: copyBuffers(deviceSetBuffers(this.deviceSpec)),
      queues: this.virtio.functions.map((_, i) => paused.ioQueues?.[i]),
    };
    return writeSnapshotDir(dir, {
      tskvmVersion: opts.tskvmVersion,
      body: {
        host: collectHostFacts(this.kvm, vcpus[0]?.tscKhz ?? 0),
        machine: encodeMachine(saved),
        vm: vmState,
        vcpus,
        devices: encodeDevices(devices),
        annotations: opts.annotations ?? null,
      },
      writeRam: (fd) => writeRamFile(this.memory, fd),
    });
  }

  /**
   * virtiofsd keeps the FUSE session (inodes, open files) in its own process, where no
   * snapshot can reach it: a share may be saved only while the guest has never made a
   * request on it (not mounted: no FUSE_INIT), so that a fresh virtiofsd can serve it after
   * a restore. Two witnesses, both 0 on every queue: the index virtiofsd itself reported
   * when the pause stopped its queues (GET_VRING_BASE: its count of requests taken, which
   * the guest cannot rewrite), and the available and used indices in guest RAM. A guest that
   * fooled both (65536 requests to wrap the count, then rewrote its rings) would only break
   * its own share after a restore: the fresh virtiofsd knows none of its inodes.
   */
  private checkSharesUnused(ioQueues: (QueueStates | undefined)[] | undefined): void {
    this.virtio.functions.forEach((f, i) => {
      if (f.device.kind !== "virtio-fs") return;
      const tag = f.device.fs.tag;
      const taken = (ioQueues?.[i] ?? []).some((q) => q !== undefined && q.nextAvail !== 0);
      const side = new VirtioPciDeviceSide(f.transport);
      const inRam = side.queueConfigs().some((q) => {
        if (!q.ready || !this.memory.contains(q.availAddr, 4) || !this.memory.contains(q.usedAddr, 4)) return false;
        return this.memory.readU16(q.availAddr + 2) !== 0 || this.memory.readU16(q.usedAddr + 2) !== 0;
      });
      if (taken || inRam) {
        throw new SnapshotError("state", `the guest has used share ${tag} (its FUSE session lives in virtiofsd, which a snapshot cannot keep): snapshot before the guest mounts it (mountShares: false)`);
      }
    });
  }

  /** A restored machine's per-run (detached) disks: index and size now, in sectors. */
  private detached: { index: number; sectors: number }[] = [];

  /** The per-run disks of a restored machine (see SavedDisk.detached), with their sizes now. */
  detachedDisks(): { index: number; sectors: number }[] {
    return this.detached.slice();
  }

  get cpus(): number {
    return this.vcpus.length;
  }

  /** The disk images attached, in order (vda, vdb, ...). */
  diskPaths(): string[] {
    return this.virtio.images.map((i) => i.path);
  }

  /** The TAP devices attached, in order (eth0, ...). */
  tapNames(): string[] {
    return this.virtio.taps.map((t) => t.name);
  }

  /**
   * A restored machine's per-run (detached) disks: one that is another size now has its
   * capacity changed in its configuration space, and a configuration-change interrupt
   * tells the driver to read it again (it arrives when the guest runs).
   */
  private attachDetachedDisks(saved: SavedMachine): void {
    saved.disks.forEach((d, i) => {
      const image = this.virtio.images[i]!;
      if (d.detached) this.detached.push({ index: i, sectors: image.sizeBytes / SECTOR_SIZE });
      if (!d.detached || image.sizeBytes === d.identity.size) return;
      const f = this.virtio.functions[i]!;
      const side = new VirtioPciDeviceSide(f.transport);
      const capacity = new Uint8Array(8);
      new DataView(capacity.buffer).setBigUint64(0, BigInt(image.sizeBytes / SECTOR_SIZE), true);
      side.updateDeviceConfig(BlkConfig.CAPACITY, capacity);
      const d2 = side.signalConfigChange();
      if (d2.kind === "msix") this.vm.signalMsi(d2.address % 0x1_0000_0000, Math.floor(d2.address / 0x1_0000_0000), d2.data);
      else if (d2.kind === "intx") sys.signalEventfd(f.intxFd);
    });
  }

  /** Bytes the guest has written to its serial console so far (all vCPUs). */
  consoleBytesWritten(): number {
    return this.devices.serial.txBytes;
  }

  /** Resolves once every vCPU thread is up and about to enter KVM_RUN (after run()). */
  allStarted(): Promise<void> {
    return Promise.all(this.threads.map((t) => t.started)).then(() => undefined);
  }

  /** End the VM from the host side (signal, Ctrl-A x, API). Idempotent. */
  stop(reason: string): void {
    this.requestedBy ??= reason;
    this.firstStop ??= { kind: "stopped" };
    this.stopAll();
  }

  /**
   * Every second, ask each vCPU whether it is dead-halted (HLT with interrupts off); when
   * all are, the guest halted or powered off: end the VM. A probe costs each vCPU one kick.
   */
  private startHaltProbes(): void {
    const probe = () => {
      const gen = Atomics.add(this.control, RunControlCell.HALT_PROBE, 1) + 1;
      for (const t of this.threads) t.kick();
      this.haltTimer = setTimeout(() => {
        const all = this.vcpus.every((v) => Atomics.load(this.haltStatus, v.id) === gen);
        if (all && this.firstStop === undefined) {
          this.firstStop = { kind: "halted", reason: "guest halted: every vCPU stopped with interrupts off (power-off or halt)" };
          this.stopAll();
        } else {
          this.haltTimer = setTimeout(probe, HALT_PROBE_INTERVAL_MS);
        }
      }, HALT_PROBE_ANSWER_MS);
    };
    this.haltTimer = setTimeout(probe, HALT_PROBE_INTERVAL_MS);
  }

  private stopHaltProbes(): void {
    if (this.haltTimer !== undefined) clearTimeout(this.haltTimer);
    this.haltTimer = undefined;
  }

  /** Have every vCPU report its registers (a "registers" diagnostic) and carry on (Ctrl-A d). */
  dumpRegisters(): void {
    Atomics.add(this.control, RunControlCell.DUMP, 1);
    for (const t of this.threads) t.kick();
  }

  private onVcpuStop(r: VcpuThreadResult): void {
    this.firstStop ??= r.stop;
    this.stopAll();
  }

  private stopAll(): void {
    this.stopHaltProbes();
    Atomics.store(this.control, RunControlCell.STOP, 1);
    // Parked vCPUs sleep on the PAUSE cell.
    Atomics.notify(this.control, RunControlCell.PAUSE);
    for (const t of this.threads) t.kick();
  }

  /**
   * Bytes typed on the host for the guest's serial console. The UART's receive FIFO is
   * finite; what does not fit waits here and is retried as the guest drains it.
   */
  sendInput(bytes: Uint8Array): void {
    this.inputs[0]!.send(bytes);
  }

  /**
   * Bytes for COM2 (index 1), COM3 (2) or COM4 (3), queued like sendInput's (index 0 is the
   * console). tskvm's guest agent reads its requests from COM2.
   */
  sendSerialInput(index: number, bytes: Uint8Array): void {
    const input = this.inputs[index];
    if (input === undefined) throw new RangeError(`no serial port ${index}: use 0..${this.inputs.length - 1}`);
    input.send(bytes);
  }

  private stopInput(): void {
    for (const input of this.inputs) input.clear();
  }

  /** Release every KVM object and guest RAM. Only after run() has resolved (or never ran). */
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    // Built but never run: the boot vCPU's thread still waits for its init.
    void this.bootWorker?.worker.terminate();
    this.bootWorker = undefined;
    this.stopInput();
    for (const v of this.vcpus) v.destroy();
    for (const fd of this.virtio.fds) sys.close(fd);
    for (const image of this.virtio.images) image.close();
    for (const tap of this.virtio.taps) tap.close();
    this.memory.free();
    this.vm.close();
    this.kvm.close();
  }
}

/** Host input for one UART, queued while its receive FIFO is full and retried every 5 ms. */
class SerialInput {
  private queue: Uint8Array[] = [];
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly uart: Serial,
    private readonly stopped: () => boolean,
  ) {}

  send(bytes: Uint8Array): void {
    if (bytes.byteLength === 0) return;
    this.queue.push(bytes);
    this.pump();
  }

  private pump(): void {
    while (this.queue.length > 0) {
      const head = this.queue[0]!;
      const taken = this.uart.receive(head);
      if (taken === head.byteLength) {
        this.queue.shift();
        continue;
      }
      if (taken > 0) this.queue[0] = head.subarray(taken);
      break;
    }
    if (this.queue.length > 0 && this.timer === undefined && !this.stopped()) {
      this.timer = setTimeout(() => {
        this.timer = undefined;
        this.pump();
      }, 5);
    }
  }

  clear(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    this.queue = [];
  }
}

/**
 * Open the disk images and TAP devices (a stream NIC comes with its socket) and give each a virtio-pci function: a slot, its
 * shared transport state, eventfds for queue kicks and for its INTx line (irqfd with a
 * resample fd, since the line is level-triggered), and what the I/O worker needs to run its
 * back end. Disks come first (vda, vdb, ...), then network interfaces (eth0, ...), then
 * shares (their virtiofsd is already running; each queue also gets a "call" eventfd that
 * virtiofsd signals), then the entropy device.
 */
function openVirtioDevices(
  vm: Vm,
  memory: GuestMemory,
  devices: { disks: readonly DiskConfig[]; nics: readonly NicConfig[]; shares: readonly ShareConfig[]; rng: boolean },
  irqchip: boolean,
  cleanups: (() => void)[],
  ioEngine: IoEngineChoice | undefined,
): VirtioResources {
  const { disks, nics, shares, rng } = devices;
  const res: VirtioResources = { ioEngine: undefined, functions: [], fds: [], images: [], taps: [], controlFd: undefined, disks: [], nics: [], shares: [] };
  if (disks.length + nics.length + shares.length === 0 && !rng) return res;
  const engine = chooseIoEngine(ioEngine);
  res.ioEngine = engine;
  if (!irqchip) throw new ConfigError("virtio devices need the in-kernel irqchip");
  const eventfd = () => {
    const fd = sys.eventfd(0, sys.EFD_NONBLOCK);
    res.fds.push(fd);
    return fd;
  };
  cleanups.push(() => {
    for (const fd of res.fds) sys.close(fd);
    for (const image of res.images) image.close();
    for (const tap of res.taps) tap.close();
  });
  res.controlFd = eventfd();
  const add = (name: string, device: VirtioDeviceSpec) => {
    const description = describeVirtioDevice(device);
    const n = res.functions.length;
    const slot: PciSlot = { device: 1 + n, intxPin: 0, gsi: PCI_GSI_BASE + (n % PCI_GSI_COUNT) };
    const transport = VirtioPciTransport.createState(description, { intxPin: slot.intxPin });
    const kickFds = Array.from({ length: description.queueCount }, eventfd);
    const intxFd = eventfd();
    const resampleFd = eventfd();
    vm.assignIrqfd(intxFd, slot.gsi, resampleFd);
    res.functions.push({ name, slot, device, transport, kickFds, intxFd, resampleFd });
  };
  disks.forEach((d, i) => {
    const image = openDiskImage(d.path, { readOnly: d.readOnly });
    res.images.push(image);
    const disk = { fd: image.fd, sizeBytes: image.sizeBytes, readOnly: image.readOnly, path: image.path, serial: d.serial ?? defaultSerial(image.path), engine: engine.name };
    res.disks.push({ serial: disk.serial });
    add(`virtio-blk vd${String.fromCharCode(0x61 + (i % 26))} (${d.path})`, { kind: "virtio-blk", disk });
  });
  nics.forEach((n, i) => {
    if ("stream" in n) {
      const backend = { kind: "stream" as const, fd: n.stream.fd, name: n.stream.name, reportsOwnLoss: n.stream.reportsOwnLoss ?? false };
      const mac = n.mac ?? defaultMac(n.stream.name);
      res.nics.push({ kind: "stream", name: n.stream.name, mac });
      // A stream carries plain frames: no offloads (stream-backend.ts).
      add(`virtio-net eth${i} (${n.stream.name})`, { kind: "virtio-net", nic: { backend, mac, offloads: false, engine: engine.name } });
      return;
    }
    const mac = n.mac ?? defaultMac(n.tap);
    const tap = openTap(n.tap, { vnetHeaderSize: 12 });
    res.taps.push(tap);
    if (n.hostCidr !== undefined) configureHostSide(tap.name, n.hostCidr);
    const nic = { backend: { kind: "tap" as const, fd: tap.fd, name: tap.name, created: tap.created }, mac, offloads: probeOffloads(tap), engine: engine.name };
    res.nics.push({ kind: "tap", tap: n.tap, mac, ...(n.hostCidr !== undefined ? { hostCidr: n.hostCidr } : {}) });
    add(`virtio-net eth${i} (${tap.name})`, { kind: "virtio-net", nic });
  });
  for (const share of shares) {
    const callFds = Array.from({ length: fsDescription({ tag: share.tag, backendFeatures: share.backend.features }).queueCount }, eventfd);
    const fs: FsSpec = { tag: share.tag, name: share.name, connFd: share.connFd, backend: share.backend, memory: memory.shared!, callFds };
    res.shares.push({ tag: share.tag });
    add(`virtio-fs ${share.tag} (${share.name})`, { kind: "virtio-fs", fs });
  }
  if (rng) add("virtio-rng", { kind: "virtio-rng" });
  return res;
}

function allocateMemory(bytes: number, shared: boolean): GuestMemory {
  try {
    return GuestMemory.allocate(ramLayout(bytes), { shared });
  } catch (e) {
    throw new ConfigError(`cannot reserve ${formatBytes(bytes)} of guest memory on this host (${(e as Error).message}): give less`, "memoryBytes");
  }
}

/** Atomics.waitAsync (Node 16+; not in TypeScript's ES2022 library). */
function waitAsync(cells: Int32Array, index: number, value: number): { async: false; value: string } | { async: true; value: Promise<string> } {
  return (Atomics as unknown as { waitAsync: typeof waitAsync }).waitAsync(cells, index, value);
}

/** Fill fresh shared RAM with a snapshot's (restore of a VM with vhost-user devices). */
function copySnapshotRam(snap: ReadSnapshot, memory: GuestMemory): void {
  try {
    readRamFileInto(snap.ramPath, memory);
  } catch (e) {
    if (e instanceof RamFileError) throw new SnapshotError("corrupted", `snapshot ${snap.dir} is corrupted: ${e.message}`);
    throw e;
  }
}

function mapSnapshotRam(snap: ReadSnapshot, bytes: number): GuestMemory {
  try {
    return mapRamFile(snap.ramPath, ramLayout(bytes));
  } catch (e) {
    if (e instanceof RamFileError) throw new SnapshotError("corrupted", `snapshot ${snap.dir} is corrupted: ${e.message}`);
    throw e;
  }
}

/**
 * Every disk the guest may hold parts of in its memory (page cache, file systems) must be
 * the image the snapshot saw, unchanged; a detached one may be any image now.
 */
function checkDisks(dir: string, saved: SavedMachine, virtio: VirtioResources): void {
  saved.disks.forEach((d, i) => {
    if (d.detached) return;
    const image = virtio.images[i]!;
    const change = identityChange(d.identity, openFileIdentity(image.fd, image.path));
    if (change !== undefined) {
      throw new SnapshotError("changed", `disk image ${image.path} is not as snapshot ${dir} saw it (${change}), and the guest holds parts of it in memory: make the snapshot again`);
    }
  });
}

/** TSC rates closer than this (parts per million) are the same clock measured twice (QEMU's and Firecracker's tolerance). */
const TSC_KHZ_TOLERANCE_PPM = 250;

/**
 * Put the saved KVM state into a new machine's VM and vCPUs: the TSC rate first (scaled
 * when this host's differs), then the VM (PIT, clock, irqchips), then each vCPU. The
 * guest's clocks go on from where they were: its wall clock is set afterwards by whoever
 * talks to the guest (the API, through its agent).
 */
function restoreKvmState(snap: ReadSnapshot, vm: Vm, vcpus: readonly Vcpu[]): void {
  const states = snap.body.vcpus;
  const saved = states[0]?.tscKhz;
  if (saved !== undefined && saved > 0) {
    const here = getTscKhz(vcpus[0]!);
    if (Math.abs(here - saved) * 1_000_000 > saved * TSC_KHZ_TOLERANCE_PPM) {
      try {
        for (const v of vcpus) setTscKhz(v, saved);
      } catch {
        throw new SnapshotError("host", `snapshot ${snap.dir} cannot run on this host: its guest's TSC ran at ${saved} kHz, this host's at ${here} kHz, and KVM cannot scale it`);
      }
    }
  }
  try {
    restoreVmState(vm, snap.body.vm);
    states.forEach((st, i) => restoreVcpuState(vcpus[i]!, st, { kvmclockCtrl: true, firstVcpu: i === 0 }));
  } catch (e) {
    throw new SnapshotError("host", `snapshot ${snap.dir} cannot run on this host: ${(e as Error).message}`);
  }
}

export function applyBootState(vcpu: Vcpu, cpu: BootCpuState): void {
  vcpu.updateSpecialRegisters((s) => {
    s.cs = cpu.sregs.cs;
    s.ds = cpu.sregs.ds;
    s.es = cpu.sregs.es;
    s.fs = cpu.sregs.fs;
    s.gs = cpu.sregs.gs;
    s.ss = cpu.sregs.ss;
    s.gdt = cpu.sregs.gdt;
    s.idt = cpu.sregs.idt;
    s.cr0 = BigInt(cpu.sregs.cr0);
    s.cr3 = BigInt(cpu.sregs.cr3);
    s.cr4 = BigInt(cpu.sregs.cr4);
    s.efer = BigInt(cpu.sregs.efer);
  });
  vcpu.setRegisters({
    rip: cpu.regs.rip,
    rsp: cpu.regs.rsp,
    rbp: cpu.regs.rbp,
    rsi: cpu.regs.rsi,
    rbx: cpu.regs.rbx,
    rflags: cpu.regs.rflags,
  });
}

/**
 * How the run ended, once a panic the guest's console reported is counted: the reset that
 * panic=N asks for, or the halt or power-off after it, is the panic's end, not the guest's
 * choice. (A stop from this side, or a failure, stays what it was.)
 */
function panicked(stop: VcpuStop, control: Int32Array): VcpuStop {
  if (Atomics.load(control, RunControlCell.PANIC) === 0) return stop;
  if (stop.kind !== "reset" && stop.kind !== "halted" && stop.kind !== "poweroff") return stop;
  return { kind: "panic", reason: `guest kernel panicked ("Kernel panic" on its console; then ${stop.reason})` };
}

export function formatBytes(n: number): string {
  const units: [number, string][] = [
    [1024 ** 3, "GiB"],
    [1024 ** 2, "MiB"],
    [1024, "KiB"],
  ];
  for (const [size, unit] of units) {
    if (n >= size && n % size === 0) return `${n / size} ${unit}`;
  }
  for (const [size, unit] of units) if (n >= size) return `${(n / size).toFixed(1)} ${unit}`;
  return `${n} bytes`;
}

export { KvmUnavailableError };
export type { CpuidEntry };
