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
import { linuxHidingArgs, resolveHiddenFeatures, vcpuCpuid, CPU_TEMPLATES, CpuidEntry } from "../kvm/cpuid";
import { maxMpTableCpus } from "../arch/x86/mptable";
import * as sys from "../sys/libc";
import { openDiskImage, type DiskImage } from "../host/disk-image";
import { VirtioPciTransport } from "../devices/virtio/pci-transport";
import { defaultSerial } from "../devices/virtio/blk/device";
import type { PciSlot } from "../devices/pci/types";
import { IoThread, createIoControl } from "../io/io-thread";
import { describeVirtioDevice, type VirtioDeviceSpec, type VirtioFunctionSpec } from "../board/virtio-devices";
import { openTap, configureHostSide, type Tap } from "../host/tap";
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
import { prepareBoot, BootSource, BootSummary } from "./boot-source";
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
  /** virtio-net interfaces on TAP devices, in order: eth0, eth1, ... */
  nics?: readonly NicConfig[];
}

export interface NicConfig {
  /** TAP name: created (and removed on exit) unless a persistent one exists. */
  tap: string;
  /** The guest's MAC (6 bytes); default stable, derived from the TAP name. */
  mac?: Uint8Array;
  /** Bring the host end up with this address ("192.168.100.1/24"). */
  hostCidr?: string;
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
    private readonly vm: Vm,
    readonly memory: GuestMemory,
    private readonly vcpus: Vcpu[],
    private readonly deviceSpec: DeviceSetSpec,
    readonly boot: BootSummary,
    private readonly consoleFd: number,
    readonly cpuTemplate: string,
    private readonly virtio: VirtioResources,
    private readonly irqchip: boolean,
  ) {
    // The main thread's own view of the devices: it feeds serial input, and plays
    // firmware for PCI (BAR addresses; the first ioeventfd registrations).
    this.devices = instantiateDevices(deviceSpec, {
      vmFd: vm.fd,
      consoleFd,
      memory,
      control: { requestReset: (reason) => this.stop(reason) },
      ...(virtio.controlFd !== undefined ? { ioControlFd: virtio.controlFd } : {}),
    });
    this.devices.pci?.assignResources();
    const stopped = () => Atomics.load(this.control, RunControlCell.STOP) !== 0;
    this.inputs = [this.devices.serial, ...this.devices.auxSerials].map((uart) => new SerialInput(uart, stopped));
    if (virtio.controlFd !== undefined) {
      this.io = new IoThread({
        memory: memory.describe(),
        vmFd: vm.fd,
        controlFd: virtio.controlFd,
        control: createIoControl(),
        devices: virtio.functions,
      });
      this.io.onWarning = (message) => this.onDiagnostic({ kind: "warning", message });
    }
  }

  private io: IoThread | undefined;

  /** Build the whole machine; nothing runs until run(). Cleans up after itself on failure. */
  static create(config: MachineConfig): Machine {
    const cleanups: (() => void)[] = [];
    const begin = performance.now();
    try {
      const m = Machine.build(config, cleanups);
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

  private static build(config: MachineConfig, cleanups: (() => void)[]): Machine {
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
    const limits = kvm.vcpuLimits();
    const maxCpus = Math.min(limits.max, maxMpTableCpus((config.disks ?? []).length + (config.nics ?? []).length));
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

    const memory = allocateMemory(config.memoryBytes);
    cleanups.push(() => memory.free());
    memory.regions.forEach((r, slot) => vm.setMemoryRegion(slot, r.base, r.size, r.hostAddress!));

    const virtio = openVirtioDevices(vm, config.disks ?? [], config.nics ?? [], irqchip, cleanups, config.ioEngine);
    const boot = prepareBoot(memory, config.boot, {
      cpus: config.cpus,
      extraCmdline: [...template.linuxArgs, ...linuxHidingArgs(hidden)],
      pciIrqs: virtio.functions.map((f) => ({ device: f.slot.device, pin: f.slot.intxPin, ioapicPin: f.slot.gsi })),
    });
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

    const supported = kvm.supportedCpuid();
    const runSize = kvm.vcpuMmapSize();
    const vcpus: Vcpu[] = [];
    for (let id = 0; id < config.cpus; id++) {
      const vcpu = Vcpu.map(id, vm.createVcpu(id), runSize);
      vcpus.push(vcpu);
      cleanups.push(() => vcpu.destroy());
      vcpu.setCpuid(vcpuCpuid(supported, { apicId: id, vcpuCount: config.cpus, hidden }));
      applyBootMsrs(vcpu);
      if (irqchip) configureLapicForBoot(vcpu);
      // Application processors wait for INIT/SIPI in the in-kernel LAPIC; only the BSP
      // gets the boot state.
      if (id === 0) applyBootState(vcpu, boot.cpu);
    }
    const machine = new Machine(kvm, vm, memory, vcpus, deviceSpec, boot, config.consoleFd, templateName, virtio, irqchip);
    machine.bootWorker = bootWorker;
    return machine;
  }

  private createdAt = { begin: NaN, end: NaN };

  /**
   * Where start-up time went, in ms since this process started: until Machine.create was
   * called (Node, module loading, option handling), building the machine (KVM, RAM, kernel
   * and initrd, devices, vCPUs), and until the boot vCPU entered KVM_RUN (NaN before it has).
   */
  startupTimeline(): { createBegin: number; createEnd: number; firstKvmRun: number } {
    return { createBegin: this.createdAt.begin, createEnd: this.createdAt.end, firstKvmRun: this.threads[0]?.firstRunAt ?? NaN };
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
      const stop = this.firstStop ?? results[0]?.stop ?? { kind: "stopped" as const };
      const exits = mergeExitStats(results.flatMap((r) => (r.exits === undefined ? [] : [r.exits])));
      return { stop, requestedBy: this.requestedBy, vcpus: results, counters, exits };
    });
    return this.running;
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
 * Open the disk images and TAP devices and give each a virtio-pci function: a slot, its
 * shared transport state, eventfds for queue kicks and for its INTx line (irqfd with a
 * resample fd, since the line is level-triggered), and what the I/O worker needs to run its
 * back end. Disks come first (vda, vdb, ...), then network interfaces (eth0, ...).
 */
function openVirtioDevices(
  vm: Vm,
  disks: readonly DiskConfig[],
  nics: readonly NicConfig[],
  irqchip: boolean,
  cleanups: (() => void)[],
  ioEngine: IoEngineChoice | undefined,
): VirtioResources {
  const res: VirtioResources = { ioEngine: undefined, functions: [], fds: [], images: [], taps: [], controlFd: undefined };
  if (disks.length + nics.length === 0) return res;
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
    add(`virtio-blk vd${String.fromCharCode(0x61 + (i % 26))} (${d.path})`, { kind: "virtio-blk", disk });
  });
  nics.forEach((n, i) => {
    const mac = n.mac ?? defaultMac(n.tap);
    const tap = openTap(n.tap, { vnetHeaderSize: 12 });
    res.taps.push(tap);
    if (n.hostCidr !== undefined) configureHostSide(tap.name, n.hostCidr);
    const nic = { tapFd: tap.fd, tapName: tap.name, created: tap.created, mac, offloads: probeOffloads(tap), engine: engine.name };
    add(`virtio-net eth${i} (${tap.name})`, { kind: "virtio-net", nic });
  });
  return res;
}

function allocateMemory(bytes: number): GuestMemory {
  try {
    return GuestMemory.allocate(ramLayout(bytes));
  } catch (e) {
    throw new ConfigError(`cannot reserve ${formatBytes(bytes)} of guest memory on this host (${(e as Error).message}): give less`, "memoryBytes");
  }
}

function applyBootState(vcpu: Vcpu, cpu: BootCpuState): void {
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
