import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { IrqchipId, KvmIrqRouting, KvmIrqRoutingEntry, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI } from "../../src/kvm/abi";
import {
  FIRST_MSI_GSI,
  GsiRoutingError,
  GsiRoutingTable,
  MsiRoutes,
  defaultIrqchipRoutes,
} from "../../src/kvm/gsi-routing";

describe("GSI routing table", () => {
  it("keeps KVM's own irqchip routes: GSI 0-15 to PIC and IOAPIC, 16-23 to the IOAPIC", () => {
    const routes = defaultIrqchipRoutes();
    assert.equal(routes.length, 24 + 16);
    const of = (gsi: number) => routes.filter((r) => r.gsi === gsi);
    assert.deepEqual(of(0), [
      { gsi: 0, type: "irqchip", irqchip: IrqchipId.IOAPIC, pin: 0 },
      { gsi: 0, type: "irqchip", irqchip: IrqchipId.PIC_MASTER, pin: 0 },
    ]);
    assert.deepEqual(of(10).map((r) => r.type === "irqchip" && [r.irqchip, r.pin]), [[IrqchipId.IOAPIC, 10], [IrqchipId.PIC_SLAVE, 2]]);
    assert.deepEqual(of(23), [{ gsi: 23, type: "irqchip", irqchip: IrqchipId.IOAPIC, pin: 23 }]);
    assert.deepEqual(new GsiRoutingTable().entries(), routes);
  });

  it("hands out MSI GSIs from 24, reuses released ones, and re-points routes", () => {
    const t = new GsiRoutingTable();
    const a = t.allocateMsi({ address: 0xfee0_0000n, data: 0x41 });
    const b = t.allocateMsi({ address: 0xfee0_1000n, data: 0x42 });
    assert.deepEqual([a, b], [FIRST_MSI_GSI, FIRST_MSI_GSI + 1]);
    assert.equal(t.setMsi(a, { address: 0xfee0_0000n, data: 0x41 }), false, "unchanged");
    assert.equal(t.setMsi(a, { address: 0xfee0_2000n, data: 0x43 }), true);
    assert.deepEqual(t.msiFor(a), { address: 0xfee0_2000n, data: 0x43 });
    t.release(a);
    assert.equal(t.msiFor(a), undefined);
    assert.equal(t.allocateMsi({ address: 0xfee0_0000n, data: 0x44 }), a);
    assert.throws(() => t.setMsi(99, { address: 0n, data: 0 }), GsiRoutingError);
    assert.throws(() => t.release(99), GsiRoutingError);
  });

  it("runs out of GSIs with a message rather than asking KVM for too many", () => {
    const t = new GsiRoutingTable(FIRST_MSI_GSI + 2);
    t.allocateMsi({ address: 0xfee0_0000n, data: 1 });
    t.allocateMsi({ address: 0xfee0_0000n, data: 2 });
    assert.throws(() => t.allocateMsi({ address: 0xfee0_0000n, data: 3 }), /no GSI left/);
  });

  it("encodes struct kvm_irq_routing: irqchip and MSI entries at their offsets", () => {
    const t = new GsiRoutingTable();
    const gsi = t.allocateMsi({ address: 0x1_fee0_1000n, data: 0x4041 });
    const buf = t.encode();
    const dv = new DataView(buf.buffer);
    const n = 40 + 1;
    assert.equal(dv.getUint32(KvmIrqRouting.nr, true), n);
    assert.equal(buf.byteLength, KvmIrqRouting.size + n * KvmIrqRoutingEntry.size);
    const first = KvmIrqRouting.entries;
    assert.equal(dv.getUint32(first + KvmIrqRoutingEntry.type, true), KVM_IRQ_ROUTING_IRQCHIP);
    assert.equal(dv.getUint32(first + KvmIrqRoutingEntry.u, true), IrqchipId.IOAPIC);
    const last = KvmIrqRouting.entries + (n - 1) * KvmIrqRoutingEntry.size;
    assert.equal(dv.getUint32(last + KvmIrqRoutingEntry.gsi, true), gsi);
    assert.equal(dv.getUint32(last + KvmIrqRoutingEntry.type, true), KVM_IRQ_ROUTING_MSI);
    assert.equal(dv.getUint32(last + KvmIrqRoutingEntry.u, true), 0xfee0_1000);
    assert.equal(dv.getUint32(last + KvmIrqRoutingEntry.u + 4, true), 1);
    assert.equal(dv.getUint32(last + KvmIrqRoutingEntry.u + 8, true), 0x4041);
    assert.equal(dv.getUint32(last + KvmIrqRoutingEntry.flags, true), 0);
  });
});

describe("MsiRoutes", () => {
  it("commits the whole table on each change, and nothing when nothing changed", () => {
    const commits: number[] = [];
    const vm = { setGsiRouting: (t: Uint8Array) => commits.push(new DataView(t.buffer).getUint32(0, true)) };
    const routes = new MsiRoutes(vm);
    const a = routes.add({ address: 0xfee0_0000n, data: 0x41 });
    const b = routes.add({ address: 0xfee0_0000n, data: 0x42 });
    routes.update(a, { address: 0xfee0_0000n, data: 0x41 });
    routes.update(a, { address: 0xfee0_1000n, data: 0x41 });
    routes.remove(b);
    assert.deepEqual(commits, [41, 42, 42, 41], "entry counts: 40 irqchip routes + the MSI ones");
    assert.deepEqual(routes.messageOf(a), { address: 0xfee0_1000n, data: 0x41 });
  });

  it("gives the GSI back when KVM refuses the table", () => {
    let refuse = true;
    const routes = new MsiRoutes({
      setGsiRouting: () => {
        if (refuse) throw new Error("EINVAL");
      },
    });
    assert.throws(() => routes.add({ address: 0n, data: 0 }), /EINVAL/);
    refuse = false;
    assert.equal(routes.add({ address: 0xfee0_0000n, data: 1 }), FIRST_MSI_GSI);
  });
});
