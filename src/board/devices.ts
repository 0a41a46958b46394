/**
 * The machine's device set, in two steps so that every thread can hold it:
 *
 * 1. createDeviceSetSpec() (main thread, once): allocates each device's shared register
 *    state and fixes its address and interrupt line. The result is plain data that can be
 *    posted to workers.
 * 2. instantiateDevices() (in each thread that handles exits, and in the main thread): wraps
 *    the shared state in device objects and registers them on that thread's PIO/MMIO buses.
 */
import { Bus } from "../devices/bus";
import type { ByteSink, IrqLine, VmControl } from "../devices/device";
import { Serial, COM1_BASE, COM1_IRQ, SERIAL_PORT_COUNT } from "../devices/legacy/serial";
import { SharedState } from "../devices/shared-state";
import { Cmos, CMOS_BASE, CMOS_PORT_COUNT } from "../devices/legacy/cmos";
import { I8042, I8042_BASE, I8042_KBD_IRQ, I8042_PORT_COUNT } from "../devices/legacy/i8042";
import { ABSENT_PORTS, AbsentPorts } from "../devices/legacy/legacy-ports";
import { PvPanic, PVPANIC_PORT } from "../devices/legacy/pvpanic";
import { setIrqLine, Vm } from "../kvm/kvm";
import * as sys from "../sys/libc";
import { writeAll } from "../sys/libc";
import { PciRootComplex } from "../devices/pci/root-complex";
import type { PciRootState } from "../devices/pci/root-complex";
import { VirtioPciTransport, type VirtioTransportHooks } from "../devices/virtio/pci-transport";
import type { NotifyAddress } from "../devices/virtio/transport-state";
import type { VirtioFunctionSpec } from "./virtio-devices";
import { PCI_HOLE_END } from "../arch/x86/layout";
import type { GuestMemory } from "../memory/guest-memory";

/**
 * Where a UART's output goes. Without a tag, each byte is written to `fd` as it is; with a
 * tag, as the pair [tag, byte], so that several UARTs can share one pipe and a reader can
 * tell them apart (each pair is one write(2) of at most PIPE_BUF bytes, so pairs from
 * different vCPU threads never interleave, and they arrive in the order they were sent).
 */
export interface SerialSinkSpec {
  fd: number;
  tag?: number;
}

/** A UART beyond COM1. */
export interface AuxSerialSpec {
  name: string;
  base: number;
  irq: number;
  state: SharedArrayBuffer;
  /** Absent: what the guest writes is dropped. */
  sink?: SerialSinkSpec;
}

/**
 * The PC's other three UARTs: COM2 (ttyS1), COM3 (ttyS2), COM4 (ttyS3). Linux's 8250 driver
 * finds them at these legacy addresses and IRQs (COM3 shares IRQ 4 with COM1, COM4 shares
 * IRQ 3 with COM2, as on a PC). tskvm's guest agent uses them: COM2 for control messages,
 * COM3 and COM4 for a command's stdout and stderr (docs/api.md).
 */
export const AUX_SERIAL_PORTS: readonly { name: string; base: number; irq: number }[] = Object.freeze([
  { name: "COM2 (16550A)", base: 0x2f8, irq: 3 },
  { name: "COM3 (16550A)", base: 0x3e8, irq: 4 },
  { name: "COM4 (16550A)", base: 0x2e8, irq: 3 },
]);

/** ISA IRQ lines 0..15: a cell per line with one bit per device driving it (wired OR). */
const ISA_IRQ_LINES = 16;

/** Plain data: one SharedArrayBuffer per device plus where it sits. Safe for postMessage. */
export interface DeviceSetSpec {
  /** COM1, the console. Its output goes to the thread's consoleFd, tagged when `consoleTag` is set. */
  serial: { base: number; irq: number; state: SharedArrayBuffer; consoleTag?: number; coalesceTx?: boolean };
  /** COM2..COM4 (see AUX_SERIAL_PORTS). */
  auxSerials: AuxSerialSpec[];
  /** Levels of the ISA IRQ lines the UARTs share (SharedState, one cell per line). */
  isaIrqs: SharedArrayBuffer;
  cmos: { base: number; state: SharedArrayBuffer };
  i8042: { base: number; state: SharedArrayBuffer };
  /** Present when the machine has PCI devices. */
  pci?: { root: PciRootState; functions: VirtioFunctionSpec[] };
}

export function createDeviceSetSpec(opts: {
  memory: GuestMemory;
  cpus: number;
  virtio?: VirtioFunctionSpec[];
  /** Tag COM1's output on the console fd (see SerialSinkSpec). */
  consoleTag?: number;
  /** Sinks for COM2, COM3, COM4 in that order; a missing one drops that port's output. */
  auxSinks?: readonly (SerialSinkSpec | undefined)[];
  /**
   * Let KVM coalesce COM1's THR writes while the UART allows it (KVM_CAP_COALESCED_PIO; the
   * vCPU threads then replay the ring before each exit).
   */
  coalesceConsoleTx?: boolean;
}): DeviceSetSpec {
  const lowRamBytes = opts.memory.regions.filter((r) => r.base < PCI_HOLE_END).reduce((n, r) => n + r.size, 0);
  const auxSinks = opts.auxSinks ?? [];
  if (auxSinks.length > AUX_SERIAL_PORTS.length) throw new RangeError(`at most ${AUX_SERIAL_PORTS.length} sinks for COM2..COM4`);
  return {
    serial: {
      base: COM1_BASE,
      irq: COM1_IRQ,
      state: Serial.createState().buffer,
      ...(opts.consoleTag !== undefined ? { consoleTag: opts.consoleTag } : {}),
      ...(opts.coalesceConsoleTx === true ? { coalesceTx: true } : {}),
    },
    auxSerials: AUX_SERIAL_PORTS.map((p, i) => ({
      ...p,
      state: Serial.createState().buffer,
      ...(auxSinks[i] !== undefined ? { sink: auxSinks[i]! } : {}),
    })),
    isaIrqs: SharedState.create(ISA_IRQ_LINES).buffer,
    cmos: {
      base: CMOS_BASE,
      state: Cmos.createState({ lowRamBytes, highRamBytes: opts.memory.totalBytes - lowRamBytes }).buffer,
    },
    i8042: { base: I8042_BASE, state: I8042.createState().buffer },
    ...(opts.virtio !== undefined && opts.virtio.length > 0
      ? { pci: { root: PciRootComplex.createState(), functions: opts.virtio } }
      : {}),
  };
}

/** What a thread supplies to bring the devices to life. */
export interface DeviceEnv {
  vmFd: number;
  /** Where serial output goes. */
  consoleFd: number;
  memory: GuestMemory;
  control: VmControl;
  /** The I/O worker's control eventfd: poked when a driver sets DRIVER_OK or resets. */
  ioControlFd?: number;
  /**
   * True once the VM is stopping: a UART whose reader stopped reading (a full console pipe)
   * then drops its output instead of holding its vCPU. Default: never.
   */
  stopping?: () => boolean;
  /**
   * A one-line warning for the machine's diagnostics: a KVM call that a guest access
   * triggered failed, and the device carries on without it. Default: dropped.
   */
  warn?: (message: string) => void;
}

export interface DeviceSet {
  pio: Bus;
  mmio: Bus;
  serial: Serial;
  /** COM2, COM3, COM4. */
  auxSerials: Serial[];
  pci: PciRootComplex | undefined;
}

/** An interrupt line into the in-kernel irqchip (KVM_IRQ_LINE on the VM fd). */
export function kvmIrqLine(vmFd: number, irq: number): IrqLine {
  return { set: (level) => setIrqLine(vmFd, irq, level) };
}

export function fdSink(fd: number, stopping?: () => boolean): ByteSink {
  return { write: (bytes) => void writeAll(fd, bytes, stopping) };
}

/** Largest write that stays atomic on a pipe (PIPE_BUF), in whole [tag, byte] pairs. */
const TAGGED_CHUNK = 4096 / 2;

/** Each byte as a [tag, byte] pair (see SerialSinkSpec). */
export function taggedFdSink(fd: number, tag: number, stopping?: () => boolean): ByteSink {
  if (!Number.isInteger(tag) || tag < 0 || tag > 255) throw new RangeError(`a sink tag is one byte, not ${tag}`);
  const one = Uint8Array.of(tag, 0);
  return {
    write: (bytes) => {
      if (bytes.byteLength === 1) {
        one[1] = bytes[0]!;
        writeAll(fd, one, stopping);
        return;
      }
      for (let at = 0; at < bytes.byteLength; at += TAGGED_CHUNK) {
        const part = bytes.subarray(at, at + TAGGED_CHUNK);
        const out = new Uint8Array(2 * part.byteLength);
        for (let i = 0; i < part.byteLength; i++) {
          out[2 * i] = tag;
          out[2 * i + 1] = part[i]!;
        }
        if (!writeAll(fd, out, stopping)) return;
      }
    },
  };
}

/** What Linux's panic() prints first, before its report (and before panic=N resets). */
export const KERNEL_PANIC_LINE = "Kernel panic - not syncing";

/**
 * The console's bytes pass through unchanged; when they spell KERNEL_PANIC_LINE, `onPanic`
 * is called (each time). The match runs across writes; its state is this thread's own,
 * which is enough: one panicking CPU prints the line.
 */
export function panicWatch(sink: ByteSink, onPanic: () => void): ByteSink {
  const want = Buffer.from(KERNEL_PANIC_LINE, "latin1");
  let matched = 0;
  return {
    write: (bytes) => {
      sink.write(bytes);
      for (let i = 0; i < bytes.byteLength; i++) {
        const b = bytes[i]!;
        // "K" occurs only at the line's start, so a mismatch restarts at 0, or 1 on a "K".
        matched = b === want[matched] ? matched + 1 : b === want[0] ? 1 : 0;
        if (matched === want.length) {
          matched = 0;
          onPanic();
        }
      }
    },
  };
}

const DROP: ByteSink = { write: () => undefined };

function sinkFor(spec: SerialSinkSpec | undefined, stopping?: () => boolean): ByteSink {
  if (spec === undefined) return DROP;
  return spec.tag === undefined ? fdSink(spec.fd, stopping) : taggedFdSink(spec.fd, spec.tag, stopping);
}

/**
 * One device's connection to an ISA IRQ line that other devices may drive too: the line is
 * the OR of every device's level (an ISA bus line with open-collector drivers), and KVM sees
 * a change only when that OR changes, so a device asserting a line another device already
 * holds high makes no edge. The update and the KVM_IRQ_LINE call happen under the lines'
 * lock, so that levels reach the irqchip in the order the OR changed.
 */
export function sharedIrqLine(vmFd: number, lines: SharedState, irq: number, source: number, setLine = setIrqLine): IrqLine {
  const bit = 1 << source;
  return {
    set: (level) => {
      lines.lock();
      try {
        const old = lines.get(irq);
        const now = level ? old | bit : old & ~bit;
        if (now === old) return;
        lines.set(irq, now);
        if ((old !== 0) !== (now !== 0)) setLine(vmFd, irq, now !== 0);
      } finally {
        lines.unlock();
      }
    },
  };
}

export function instantiateDevices(spec: DeviceSetSpec, env: DeviceEnv): DeviceSet {
  const pio = new Bus("port I/O", 0x10000);
  const mmio = new Bus("MMIO");
  const lines = new SharedState(spec.isaIrqs, ISA_IRQ_LINES);
  // Every UART gets its own source bit on its (possibly shared) line.
  const uartIrq = (irq: number, source: number) => sharedIrqLine(env.vmFd, lines, irq, source);
  const consoleSink = panicWatch(
    spec.serial.consoleTag !== undefined ? taggedFdSink(env.consoleFd, spec.serial.consoleTag, env.stopping) : fdSink(env.consoleFd, env.stopping),
    () => env.control.guestPanicked("guest kernel panicked", false),
  );
  const base = spec.serial.base;
  const coalescing = spec.serial.coalesceTx === true ? { set: (on: boolean) => new Vm(env.vmFd).coalescePio(base, 1, on) } : undefined;
  const serial = new Serial(spec.serial.state, consoleSink, uartIrq(spec.serial.irq, 0), coalescing);
  pio.register(spec.serial.base, SERIAL_PORT_COUNT, serial, "COM1 (16550A)");
  const auxSerials = spec.auxSerials.map((p, i) => {
    const uart = new Serial(p.state, sinkFor(p.sink, env.stopping), uartIrq(p.irq, 1 + i));
    pio.register(p.base, SERIAL_PORT_COUNT, uart, p.name);
    return uart;
  });
  pio.register(spec.cmos.base, CMOS_PORT_COUNT, new Cmos(spec.cmos.state), "CMOS/RTC");
  pio.register(spec.i8042.base, I8042_PORT_COUNT, new I8042(spec.i8042.state, env.control, kvmIrqLine(env.vmFd, I8042_KBD_IRQ)), "i8042");
  pio.register(PVPANIC_PORT, 1, new PvPanic(env.control), "pvpanic");
  const absent = new AbsentPorts();
  for (const p of ABSENT_PORTS) pio.register(p.base, p.length, absent, p.name);
  let pci: PciRootComplex | undefined;
  if (spec.pci !== undefined) {
    pci = new PciRootComplex(spec.pci.root);
    for (const f of spec.pci.functions) {
      pci.add(f.slot, new VirtioPciTransport(f.transport, virtioHooks(f, env), f.name));
    }
    pci.registerOn(pio, mmio);
  }
  return { pio, mmio, serial, auxSerials, pci };
}

/** What a virtio transport asks of the machine, in whichever thread took the exit. */
function virtioHooks(f: VirtioFunctionSpec, env: DeviceEnv): VirtioTransportHooks {
  const vm = new Vm(env.vmFd);
  const warn = env.warn ?? (() => undefined);
  // Each of these is a system call a guest register access triggers. Its failure (an MSI to
  // an address no CPU answers, an eventfd closed while the VM stops) is the guest's or the
  // moment's, never a reason to end the VM from a vCPU thread: say so and carry on.
  const contained = (what: string, call: () => void): void => {
    try {
      call();
    } catch (e) {
      warn(`${f.name}: ${what} failed (${(e as Error).message}); the device carries on without it`);
    }
  };
  const pokeIo = (what: string) => () => {
    if (env.ioControlFd !== undefined) contained(what, () => sys.signalEventfd(env.ioControlFd!));
  };
  return {
    kick: (queue) => {
      const fd = f.kickFds[queue];
      if (fd !== undefined) contained(`the kick of queue ${queue}`, () => sys.signalEventfd(fd));
    },
    reset: pokeIo("telling the I/O worker of a reset"),
    driverOk: pokeIo("telling the I/O worker of DRIVER_OK"),
    notifyAddressChanged: (now, before) => {
      const failure = moveIoeventfds(vm, f.kickFds, now, before);
      if (failure !== undefined) warn(`${f.name}: ${failure}`);
    },
    msixUnmasked: (vector, m) =>
      contained(`MSI-X vector ${vector}`, () => vm.signalMsi(m.address % 0x1_0000_0000, Math.floor(m.address / 0x1_0000_0000), m.data)),
    // A vhost-user back end's interrupts are routed in KVM (board/vhost-irq.ts): the I/O
    // worker re-routes them when the driver changes MSI-X.
    ...(f.device.kind === "virtio-fs" ? { msixChanged: pokeIo("telling the I/O worker of an MSI-X change") } : {}),
  };
}

/** The one KVM call moving notifications needs: a fake in tests. */
export type IoeventfdRegistrar = Pick<Vm, "ioeventfd">;

/**
 * Move the queue notification ioeventfds from where they were (`before`) to where they are
 * now, so that a kick signals the queue's eventfd inside the kernel with no exit. Runs in
 * whichever thread saw the change, under the transport's lock; the transport's registers
 * are the one record of what is registered.
 *
 * Returns undefined, or a one-line reason when KVM refused a registration: EEXIST when a
 * guest moved one function's BAR onto another's notify address. Then every registration
 * this call made is undone, and the function's notifications arrive as exits, which the transport turns into the same kicks, and nothing stays
 * registered that the record does not cover. (A deassignment names its eventfd, so taking
 * out what was never registered, the next time the BAR moves, touches nobody else's.)
 */
export function moveIoeventfds(
  vm: IoeventfdRegistrar,
  kickFds: readonly number[],
  now: readonly NotifyAddress[],
  before: readonly NotifyAddress[],
): string | undefined {
  const opts = (q: NotifyAddress, deassign: boolean) => ({
    pio: q.pio,
    length: q.length,
    ...(q.datamatch !== undefined ? { datamatch: q.datamatch } : {}),
    ...(deassign ? { deassign } : {}),
  });
  for (const q of before) {
    const fd = kickFds[q.index];
    if (fd === undefined) continue;
    try {
      vm.ioeventfd(fd, q.address, opts(q, true));
    } catch {
      // Never registered (an earlier move fell back to exits) or already gone.
    }
  }
  const made: NotifyAddress[] = [];
  for (const q of now) {
    const fd = kickFds[q.index];
    if (fd === undefined) continue;
    try {
      vm.ioeventfd(fd, q.address, opts(q, false));
      made.push(q);
    } catch (e) {
      for (const m of made) {
        try {
          vm.ioeventfd(kickFds[m.index]!, m.address, opts(m, true));
        } catch {
          // It was registered a moment ago; nothing else can have taken it out.
        }
      }
      const where = q.pio ? `port 0x${q.address.toString(16)}` : `address 0x${q.address.toString(16)}`;
      return `queue notifications at ${where} cannot be caught in the kernel (${(e as Error).message}); they take exits instead`;
    }
  }
  return undefined;
}

/**
 * Every SharedArrayBuffer of a device set, by a name stable across runs of the same
 * machine: all the register state of the UARTs, the ISA IRQ lines, CMOS, the i8042, the PCI
 * root and every virtio-pci function (snapshots copy them out and back in).
 */
export function deviceSetBuffers(spec: DeviceSetSpec): [string, SharedArrayBuffer][] {
  const out: [string, SharedArrayBuffer][] = [
    ["com1", spec.serial.state],
    ...spec.auxSerials.map((p, i): [string, SharedArrayBuffer] => [`com${i + 2}`, p.state]),
    ["isa-irq-lines", spec.isaIrqs],
    ["cmos", spec.cmos.state],
    ["i8042", spec.i8042.state],
  ];
  if (spec.pci !== undefined) {
    out.push(["pci-root", spec.pci.root.regs], ["pci-host-bridge", spec.pci.root.hostBridge]);
    for (const f of spec.pci.functions) {
      out.push([`pci-${f.slot.device}-config`, f.transport.config], [`pci-${f.slot.device}-virtio`, f.transport.regs]);
    }
  }
  return out;
}

/**
 * A restored machine: register every virtio function's queue-notification ioeventfds where
 * its restored registers say the driver put them (the firmware's assignment and the
 * driver's BAR moves happened in the VM the snapshot came from).
 */
export function registerRestoredIoeventfds(vm: Vm, spec: DeviceSetSpec, devices: DeviceSet): void {
  if (spec.pci === undefined || devices.pci === undefined) return;
  for (const f of spec.pci.functions) {
    const transport = devices.pci.function(f.slot.device);
    if (!(transport instanceof VirtioPciTransport)) continue;
    // The snapshot's VM held these registrations, so they fit together; should one not, the
    // function takes exits as it did there after such a move.
    moveIoeventfds(vm, f.kickFds, transport.notifyAddresses(), []);
  }
}
