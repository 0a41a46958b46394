/**
 * Function 00:00.0, the host bridge. It decodes nothing and has no BARs; it is there because
 * operating systems look for one: Linux's type-1 sanity check (pci_sanity_check) accepts the
 * configuration mechanism only if bus 0 shows a host bridge or a display controller, or a
 * device from Intel or Compaq.
 *
 * The IDs are those of the Q35 DRAM controller (8086:29c0), a host bridge every PC guest
 * knows and binds no special driver to.
 */
import type { StateLike } from "../legacy/state-like";
import { PciConfigSpace } from "./config-space";
import type { BarInfo, PciFunction } from "./types";

export const HOST_BRIDGE_VENDOR_ID = 0x8086;
export const HOST_BRIDGE_DEVICE_ID = 0x29c0;
/** Bridge device (0x06), host bridge (0x00). */
export const HOST_BRIDGE_CLASS = 0x060000;

export class HostBridge implements PciFunction {
  readonly name = "host bridge";
  readonly config: PciConfigSpace;

  static createState(): SharedArrayBuffer {
    return PciConfigSpace.create({
      vendorId: HOST_BRIDGE_VENDOR_ID,
      deviceId: HOST_BRIDGE_DEVICE_ID,
      classCode: HOST_BRIDGE_CLASS,
    }).state.buffer;
  }

  constructor(state: StateLike) {
    this.config = new PciConfigSpace(state);
  }

  configRead(offset: number, data: Uint8Array): void {
    this.config.read(offset, data);
  }

  configWrite(offset: number, data: Uint8Array): void {
    this.config.write(offset, data);
  }

  bars(): readonly BarInfo[] {
    return [];
  }

  barRead(_bar: number, _offset: number, data: Uint8Array): void {
    data.fill(0xff);
  }

  barWrite(): void {
    // No BARs, nothing to write.
  }
}
