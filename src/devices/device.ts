/**
 * The one interface every register block implements, whether it sits on the port-I/O bus or
 * the MMIO bus. `offset` is relative to the start of the range the device was registered at;
 * `data` is the access itself (1, 2, 4 or 8 bytes, little-endian), a window into the vCPU's
 * exit buffer: a read fills it, a write reads it.
 */
export interface BusDevice {
  read(offset: number, data: Uint8Array): void;
  write(offset: number, data: Uint8Array): void;
}

/**
 * An interrupt line into the in-kernel irqchip. `set` drives a level (true = asserted);
 * edge-triggered users call set(true) then set(false).
 */
export interface IrqLine {
  set(level: boolean): void;
}

/** Where a device's output bytes go (the serial console's host side). */
export interface ByteSink {
  write(bytes: Uint8Array): void;
}

/**
 * Writes to a register that KVM may keep in its coalesced ring instead of exiting for each
 * (KVM_REGISTER_COALESCED_MMIO with pio): the VMM replays them, in order, before it handles
 * the next exit of any vCPU. A device turns it on only while such a write has no effect
 * the guest could see before that exit (a UART's THR while no transmit interrupt is on).
 */
export interface WriteCoalescing {
  set(enabled: boolean): void;
}

/** What a device may ask of the VM as a whole. */
export interface VmControl {
  /**
   * The guest asked a device for a reset (the i8042's pulse of the reset line): end the VM
   * with this reason. (A triple fault is a KVM exit, handled by the exit loop itself.)
   */
  requestReset(reason: string): void;
  /**
   * The guest's kernel panicked. `now`: end the VM at once (pvpanic: its report is out).
   * Otherwise (its console's "Kernel panic" line, with the report still to come) the VM
   * runs on, and however it ends (the reset panic=N asks for, say), it ends as a panic.
   */
  guestPanicked(reason: string, now: boolean): void;
}

/** Little-endian helpers for the `data` window of an access. */
export function readValue(data: Uint8Array): number {
  switch (data.byteLength) {
    case 1:
      return data[0]!;
    case 2:
      return data[0]! | (data[1]! << 8);
    case 4:
      return (data[0]! | (data[1]! << 8) | (data[2]! << 16) | (data[3]! << 24)) >>> 0;
    default: {
      let v = 0;
      for (let i = Math.min(data.byteLength, 6) - 1; i >= 0; i--) v = v * 256 + data[i]!;
      return v;
    }
  }
}

export function writeValue(data: Uint8Array, value: number): void {
  let v = value;
  for (let i = 0; i < data.byteLength; i++) {
    data[i] = v & 0xff;
    v = i < 4 ? v >>> 8 : Math.floor(v / 256);
  }
}
