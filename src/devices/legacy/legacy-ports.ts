/**
 * Absent ports: I/O ranges a Linux guest touches at boot (POST codes and I/O delays, probes
 * for hardware a PC might have) that tskvm does not model. They answer like an empty ISA
 * bus, reads all-ones and writes dropped, which is also what the bus does for a port nobody
 * claims; claiming them only keeps the bus's "unclaimed access" counters for real surprises.
 * All-ones is the right answer for the probes: an IDE status of 0xff reads as "no
 * controller", the 8250 driver's IER test fails on 0xff (no UART), and so on.
 *
 * The behaviour is one rule for every range, so the ranges are a table and one stateless
 * device object serves them all (registered once per range):
 *
 *   const absent = new AbsentPorts();
 *   for (const p of ABSENT_PORTS) bus.register(p.base, p.length, absent, p.name);
 *
 * Not claimed here, because the kernel owns them when the in-kernel irqchip and PIT exist:
 * the PICs (0x20/0x21, 0xa0/0xa1), the ELCR (0x4d0/0x4d1) and the PIT (0x40..0x43). Port
 * 0x61 belongs to KVM's PIT speaker stub or to the i8042 device (0x60..0x64), 0x70/0x71 to
 * the CMOS, 0x3f8, 0x2f8, 0x3e8 and 0x2e8 (8 ports each) to the four UARTs COM1..COM4,
 * 0xcf8..0xcff to PCI configuration.
 */
import type { BusDevice } from "../device";

export interface PortRange {
  readonly base: number;
  readonly length: number;
  readonly name: string;
}

/** The ranges to register, in port order; none overlap. */
export const ABSENT_PORTS: readonly PortRange[] = Object.freeze([
  // Written by Linux's MP-table code to switch the IMCR out of PIC mode; Cyrix CPU probes.
  { base: 0x22, length: 2, name: "IMCR" },
  // POST codes; also Linux's default I/O delay port (io_delay=0x80), written constantly.
  { base: 0x80, length: 1, name: "POST code" },
  // ISA DMA page registers (0x87 is channel 0's); nothing does ISA DMA here.
  { base: 0x81, length: 15, name: "DMA page registers" },
  // Linux's alternative I/O delay port (io_delay=0xed).
  { base: 0xed, length: 1, name: "I/O delay" },
  { base: 0x170, length: 8, name: "IDE secondary (absent)" },
  { base: 0x1f0, length: 8, name: "IDE primary (absent)" },
  { base: 0x278, length: 8, name: "LPT2 (absent)" },
  { base: 0x376, length: 1, name: "IDE secondary control (absent)" },
  { base: 0x378, length: 8, name: "LPT1 (absent)" },
  // Monochrome display adapter registers, then the parallel port MDA cards carry.
  { base: 0x3b0, length: 12, name: "MDA (absent)" },
  { base: 0x3bc, length: 4, name: "LPT0 (absent)" },
  { base: 0x3c0, length: 32, name: "VGA (absent)" },
  // Floppy controller (0x3f0..0x3f5, 0x3f7) around the primary IDE control port (0x3f6).
  { base: 0x3f0, length: 8, name: "FDC / IDE primary control (absent)" },
  // QEMU's fw_cfg (selector, data, DMA address), which Linux's qemu_fw_cfg driver may probe.
  { base: 0x510, length: 12, name: "fw_cfg (absent)" },
]);

/**
 * The device behind every ABSENT_PORTS range. It has no state at all, so one object may be
 * registered for all ranges and built in every thread.
 */
export class AbsentPorts implements BusDevice {
  read(_offset: number, data: Uint8Array): void {
    data.fill(0xff);
  }

  write(_offset: number, _data: Uint8Array): void {
    // Dropped: POST codes and I/O-delay writes mean nothing to us.
  }
}
