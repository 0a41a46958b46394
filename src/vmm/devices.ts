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
import { Cmos, CMOS_BASE, CMOS_PORT_COUNT } from "../devices/legacy/cmos";
import { I8042, I8042_BASE, I8042_KBD_IRQ, I8042_PORT_COUNT } from "../devices/legacy/i8042";
import { ABSENT_PORTS, AbsentPorts } from "../devices/legacy/legacy-ports";
import { setIrqLine, Vm } from "../kvm/kvm";
import * as sys from "../sys/libc";
import { writeAll } from "../sys/libc";
import { PciRootComplex } from "../devices/pci/root-complex";
import type { PciRootState } from "../devices/pci/root-complex";
import type { PciSlot } from "../devices/pci/types";
import { VirtioPciTransport, type VirtioTransportHooks } from "../devices/virtio/pci-transport";
import type { NotifyAddress, VirtioPciState } from "../devices/virtio/transport-state";
import { pokeControl } from "../io/io-thread";
import { PCI_HOLE_END } from "../arch/x86/layout";
import type { GuestMemory } from "../memory/guest-memory";

/** Plain data: one SharedArrayBuffer per device plus where it sits. Safe for postMessage. */
export interface DeviceSetSpec {
  serial: { base: number; irq: number; state: SharedArrayBuffer };
  cmos: { base: number; state: SharedArrayBuffer };
  i8042: { base: number; state: SharedArrayBuffer };
  /** Present when the machine has PCI devices. */
  pci?: { root: PciRootState; functions: VirtioFunctionSpec[] };
}

/** A virtio-pci function as every exit-handling thread needs it. */
export interface VirtioFunctionSpec {
  name: string;
  slot: PciSlot;
  transport: VirtioPciState;
  /** One eventfd per queue; kicks that arrive as exits are written here too. */
  kickFds: number[];
  /**
   * The ioeventfds currently registered for this function, shared so that whichever vCPU
   * thread sees the guest move a BAR can take the old ones out: [count, then per entry
   * address, pio, datamatch (-1: none), length, queue index].
   */
  ioeventfds: SharedArrayBuffer;
}

/** Room for the registrations of one function: the count and 5 numbers per queue. */
export function ioeventfdRecord(queues: number): SharedArrayBuffer {
  return new SharedArrayBuffer(8 * (1 + 5 * queues));
}

export function createDeviceSetSpec(opts: {
  memory: GuestMemory;
  cpus: number;
  virtio?: VirtioFunctionSpec[];
}): DeviceSetSpec {
  const lowRamBytes = opts.memory.regions.filter((r) => r.base < PCI_HOLE_END).reduce((n, r) => n + r.size, 0);
  return {
    serial: { base: COM1_BASE, irq: COM1_IRQ, state: Serial.createState().buffer },
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
}

export interface DeviceSet {
  pio: Bus;
  mmio: Bus;
  serial: Serial;
  pci: PciRootComplex | undefined;
}

/** An interrupt line into the in-kernel irqchip (KVM_IRQ_LINE on the VM fd). */
export function kvmIrqLine(vmFd: number, irq: number): IrqLine {
  return { set: (level) => setIrqLine(vmFd, irq, level) };
}

export function fdSink(fd: number): ByteSink {
  return { write: (bytes) => writeAll(fd, bytes) };
}

export function instantiateDevices(spec: DeviceSetSpec, env: DeviceEnv): DeviceSet {
  const pio = new Bus("port I/O", 0x10000);
  const mmio = new Bus("MMIO");
  const serial = new Serial(spec.serial.state, fdSink(env.consoleFd), kvmIrqLine(env.vmFd, spec.serial.irq));
  pio.register(spec.serial.base, SERIAL_PORT_COUNT, serial, "COM1 (16550A)");
  pio.register(spec.cmos.base, CMOS_PORT_COUNT, new Cmos(spec.cmos.state), "CMOS/RTC");
  pio.register(spec.i8042.base, I8042_PORT_COUNT, new I8042(spec.i8042.state, env.control, kvmIrqLine(env.vmFd, I8042_KBD_IRQ)), "i8042");
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
  return { pio, mmio, serial, pci };
}

const ONE = new Uint8Array(new BigUint64Array([1n]).buffer);

/** What a virtio transport asks of the machine, in whichever thread took the exit. */
function virtioHooks(f: VirtioFunctionSpec, env: DeviceEnv): VirtioTransportHooks {
  const vm = new Vm(env.vmFd);
  const pokeIo = () => {
    if (env.ioControlFd !== undefined) pokeControl(env.ioControlFd);
  };
  return {
    kick: (queue) => {
      const fd = f.kickFds[queue];
      if (fd !== undefined) sys.write(fd, ONE);
    },
    reset: pokeIo,
    driverOk: pokeIo,
    notifyAddressChanged: (queues) => replaceIoeventfds(vm, f, queues),
    msixUnmasked: (_vector, m) => vm.signalMsi(m.address % 0x1_0000_0000, Math.floor(m.address / 0x1_0000_0000), m.data),
  };
}

/**
 * Re-register the queue notification addresses with KVM_IOEVENTFD, so that a kick signals
 * the queue's eventfd inside the kernel with no exit. Runs under the transport's lock.
 */
function replaceIoeventfds(vm: Vm, f: VirtioFunctionSpec, queues: readonly NotifyAddress[]): void {
  const rec = new Float64Array(f.ioeventfds);
  const fdOf = (index: number) => f.kickFds[index];
  for (let i = 0; i < rec[0]!; i++) {
    const [address, pio, datamatch, length, index] = [rec[1 + 5 * i]!, rec[2 + 5 * i]!, rec[3 + 5 * i]!, rec[4 + 5 * i]!, rec[5 + 5 * i]!];
    const fd = fdOf(index);
    if (fd === undefined) continue;
    try {
      vm.ioeventfd(fd, address, { pio: pio === 1, length, deassign: true, ...(datamatch >= 0 ? { datamatch } : {}) });
    } catch {
      // Already gone; nothing to undo.
    }
  }
  let n = 0;
  for (const q of queues) {
    const fd = fdOf(q.index);
    if (fd === undefined || 1 + 5 * (n + 1) > rec.length) continue;
    vm.ioeventfd(fd, q.address, { pio: q.pio, length: q.length, ...(q.datamatch !== undefined ? { datamatch: q.datamatch } : {}) });
    rec.set([q.address, q.pio ? 1 : 0, q.datamatch ?? -1, q.length, q.index], 1 + 5 * n);
    n++;
  }
  rec[0] = n;
}
