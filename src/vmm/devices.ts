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
import { setIrqLine } from "../kvm/kvm";
import { writeAll } from "../sys/libc";
import { PCI_HOLE_END } from "../arch/x86/layout";
import type { GuestMemory } from "../memory/guest-memory";

/** Plain data: one SharedArrayBuffer per device plus where it sits. Safe for postMessage. */
export interface DeviceSetSpec {
  serial: { base: number; irq: number; state: SharedArrayBuffer };
  cmos: { base: number; state: SharedArrayBuffer };
  i8042: { base: number; state: SharedArrayBuffer };
}

export function createDeviceSetSpec(opts: { memory: GuestMemory; cpus: number }): DeviceSetSpec {
  const lowRamBytes = opts.memory.regions.filter((r) => r.base < PCI_HOLE_END).reduce((n, r) => n + r.size, 0);
  return {
    serial: { base: COM1_BASE, irq: COM1_IRQ, state: Serial.createState().buffer },
    cmos: {
      base: CMOS_BASE,
      state: Cmos.createState({ lowRamBytes, highRamBytes: opts.memory.totalBytes - lowRamBytes }).buffer,
    },
    i8042: { base: I8042_BASE, state: I8042.createState().buffer },
  };
}

/** What a thread supplies to bring the devices to life. */
export interface DeviceEnv {
  vmFd: number;
  /** Where serial output goes. */
  consoleFd: number;
  memory: GuestMemory;
  control: VmControl;
}

export interface DeviceSet {
  pio: Bus;
  mmio: Bus;
  serial: Serial;
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
  return { pio, mmio, serial };
}
