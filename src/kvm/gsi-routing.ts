/**
 * KVM's GSI routing table (KVM_SET_GSI_ROUTING), so that an MSI can be raised by writing an
 * eventfd bound to a GSI with irqfd: the route says which MSI message that GSI stands for.
 * This is how a vhost-user back end (virtiofsd), which only knows its "call" eventfd,
 * raises the guest's MSI-X interrupt without any thread of ours in the path.
 *
 * KVM_SET_GSI_ROUTING replaces the WHOLE table, including the routes KVM sets up by itself
 * with the in-kernel irqchip (GSI 0-15 to the PIC and IOAPIC, 16-23 to the IOAPIC) that INTx
 * and the PIT depend on. So the table here always starts with those, and whoever changes a
 * route sends the whole table again: a table has one owner (one thread) at a time.
 *
 * Pure data and encoding; Vm.setGsiRouting() makes the call.
 */
import {
  IrqchipId,
  KVM_IRQ_ROUTING_IRQCHIP,
  KVM_IRQ_ROUTING_MSI,
  KvmIrqRouting,
  KvmIrqRoutingEntry,
} from "./abi";


/** IOAPIC pins: GSIs 0-23 belong to the irqchip; MSI routes get GSIs from here on. */
export const IOAPIC_PINS = 24;
export const FIRST_MSI_GSI = IOAPIC_PINS;
/** KVM_MAX_IRQ_ROUTES on x86 (also what KVM_CAP_IRQ_ROUTING answers). */
export const MAX_ROUTES = 4096;

export type RoutingEntry =
  | { gsi: number; type: "irqchip"; irqchip: number; pin: number }
  | { gsi: number; type: "msi"; addressLo: number; addressHi: number; data: number };

export interface MsiMessage {
  /** The 64-bit MSI address (x86: 0xFEEx_xxxx in the low half). */
  address: bigint;
  data: number;
}

/** What KVM installs by itself when the irqchip is created (kvm_setup_default_irq_routing). */
export function defaultIrqchipRoutes(): RoutingEntry[] {
  const out: RoutingEntry[] = [];
  for (let gsi = 0; gsi < IOAPIC_PINS; gsi++) {
    out.push({ gsi, type: "irqchip", irqchip: IrqchipId.IOAPIC, pin: gsi });
    if (gsi < 16) {
      out.push({ gsi, type: "irqchip", irqchip: gsi < 8 ? IrqchipId.PIC_MASTER : IrqchipId.PIC_SLAVE, pin: gsi % 8 });
    }
  }
  return out;
}

export class GsiRoutingError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "GsiRoutingError";
  }
}

/** The irqchip routes plus MSI routes on GSIs handed out from FIRST_MSI_GSI. */
export class GsiRoutingTable {
  private readonly msi = new Map<number, MsiMessage>();
  private readonly freeGsis: number[] = [];
  private nextGsi = FIRST_MSI_GSI;

  constructor(readonly maxRoutes = MAX_ROUTES) {}

  /** A GSI routed to `message`. */
  allocateMsi(message: MsiMessage): number {
    const gsi = this.freeGsis.pop() ?? this.nextGsi;
    if (gsi >= this.maxRoutes) throw new GsiRoutingError(`no GSI left for another MSI route (KVM allows ${this.maxRoutes})`);
    if (gsi === this.nextGsi) this.nextGsi++;
    this.msi.set(gsi, normalize(message));
    return gsi;
  }

  /** Point an allocated GSI at another message; false when it already pointed there. */
  setMsi(gsi: number, message: MsiMessage): boolean {
    const old = this.msi.get(gsi);
    if (old === undefined) throw new GsiRoutingError(`GSI ${gsi} has no MSI route`);
    const m = normalize(message);
    if (old.address === m.address && old.data === m.data) return false;
    this.msi.set(gsi, m);
    return true;
  }

  msiFor(gsi: number): MsiMessage | undefined {
    return this.msi.get(gsi);
  }

  release(gsi: number): void {
    if (!this.msi.delete(gsi)) throw new GsiRoutingError(`GSI ${gsi} has no MSI route`);
    this.freeGsis.push(gsi);
  }

  entries(): RoutingEntry[] {
    const out = defaultIrqchipRoutes();
    for (const [gsi, m] of [...this.msi].sort((a, b) => a[0] - b[0])) {
      out.push({ gsi, type: "msi", addressLo: Number(m.address & 0xffff_ffffn), addressHi: Number(m.address >> 32n), data: m.data });
    }
    return out;
  }

  /** struct kvm_irq_routing with its entries, for KVM_SET_GSI_ROUTING. */
  encode(): Uint8Array {
    return encodeRouting(this.entries());
  }
}

function normalize(m: MsiMessage): MsiMessage {
  return { address: BigInt.asUintN(64, m.address), data: m.data >>> 0 };
}

export function encodeRouting(entries: readonly RoutingEntry[]): Uint8Array {
  const buf = new Uint8Array(KvmIrqRouting.size + entries.length * KvmIrqRoutingEntry.size);
  const dv = new DataView(buf.buffer);
  dv.setUint32(KvmIrqRouting.nr, entries.length, true);
  entries.forEach((e, i) => {
    const o = KvmIrqRouting.entries + i * KvmIrqRoutingEntry.size;
    const u = o + KvmIrqRoutingEntry.u;
    dv.setUint32(o + KvmIrqRoutingEntry.gsi, e.gsi, true);
    if (e.type === "irqchip") {
      dv.setUint32(o + KvmIrqRoutingEntry.type, KVM_IRQ_ROUTING_IRQCHIP, true);
      dv.setUint32(u, e.irqchip, true);
      dv.setUint32(u + 4, e.pin, true);
    } else {
      dv.setUint32(o + KvmIrqRoutingEntry.type, KVM_IRQ_ROUTING_MSI, true);
      dv.setUint32(u, e.addressLo >>> 0, true);
      dv.setUint32(u + 4, e.addressHi >>> 0, true);
      dv.setUint32(u + 8, e.data >>> 0, true);
    }
  });
  return buf;
}

/**
 * One VM's MSI routes, committed to KVM on every change (the whole table each time, see
 * above). It has one owner thread: the I/O worker, which routes the vhost-user back ends'
 * call eventfds.
 */
export class MsiRoutes {
  private readonly table: GsiRoutingTable;

  constructor(private readonly vm: { setGsiRouting(table: Uint8Array): void }, maxRoutes = MAX_ROUTES) {
    this.table = new GsiRoutingTable(maxRoutes);
  }

  /** A GSI for `message`, routed in KVM when this returns. */
  add(message: MsiMessage): number {
    const gsi = this.table.allocateMsi(message);
    try {
      this.vm.setGsiRouting(this.table.encode());
    } catch (e) {
      this.table.release(gsi);
      throw e;
    }
    return gsi;
  }

  /** Point `gsi` at `message` (no system call when it already does). */
  update(gsi: number, message: MsiMessage): void {
    if (this.table.setMsi(gsi, message)) this.vm.setGsiRouting(this.table.encode());
  }

  remove(gsi: number): void {
    this.table.release(gsi);
    this.vm.setGsiRouting(this.table.encode());
  }

  messageOf(gsi: number): MsiMessage | undefined {
    return this.table.msiFor(gsi);
  }
}
