/**
 * pvpanic (QEMU's ISA device, docs/specs/pvpanic.rst): one I/O port, 0x505, through which a
 * guest kernel says it panicked. A read returns the events the device takes (bit 0
 * PANICKED, bit 1 CRASH_LOADED); a write of PANICKED ends the VM as a panic, through
 * VmControl. CRASH_LOADED (a kdump kernel takes over) is not an end: the guest goes on.
 *
 * Linux finds this port through ACPI (QEMU0001) or a device tree; tskvm has neither, so a
 * Linux guest's panics are seen on its console instead (board/devices.ts); guests that
 * know the port (or are told it) use it directly.
 */
import type { BusDevice, VmControl } from "../device";

export const PVPANIC_PORT = 0x505;
export const PVPANIC_PANICKED = 1 << 0;
export const PVPANIC_CRASH_LOADED = 1 << 1;

export class PvPanic implements BusDevice {
  constructor(private readonly control: VmControl) {}

  read(offset: number, data: Uint8Array): void {
    data.fill(0);
    if (offset === 0) data[0] = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
  }

  write(offset: number, data: Uint8Array): void {
    if (offset !== 0 || (data[0]! & PVPANIC_PANICKED) === 0) return;
    this.control.guestPanicked("guest kernel panicked (it said so through pvpanic)", true);
  }
}
