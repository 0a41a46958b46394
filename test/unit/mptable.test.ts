import { test } from "node:test";
import assert from "node:assert/strict";

import { GuestMemory } from "../../src/memory/guest-memory";
import { MiB } from "../../src/arch/x86/layout";
import { buildE820, E820_RESERVED } from "../../src/arch/x86/e820";
import {
  MAX_MPTABLE_CPUS,
  MpTableError,
  maxMpTableCpus,
  writeMpTable,
  type PciIrq,
} from "../../src/arch/x86/mptable";

// ---------------------------------------------------------------------------------------
// An independent decoder, written from the MP spec 1.4 (chapter 4) and the way Linux's
// arch/x86/kernel/mpparse.c finds and checks the tables. Only the spec's numbers are used.
// ---------------------------------------------------------------------------------------

interface Processor {
  apicId: number;
  apicVersion: number;
  enabled: boolean;
  bsp: boolean;
  signature: number;
  features: number;
}
interface Bus {
  id: number;
  type: string;
}
interface IoApic {
  id: number;
  version: number;
  enabled: boolean;
  address: number;
}
interface Interrupt {
  irqType: number; // 0 INT, 1 NMI, 2 SMI, 3 ExtINT
  polarity: number; // flags bits 1:0
  trigger: number; // flags bits 3:2
  srcBus: number;
  srcIrq: number;
  dstApic: number;
  dstPin: number; // IOAPIC INTIN# or LAPIC LINTIN#
}
interface Decoded {
  fpAddr: number;
  tableAddr: number;
  tableLength: number;
  specRev: number;
  oem: string;
  product: string;
  entryCount: number;
  lapicAddr: number;
  extLength: number;
  feature1: number;
  feature2: number;
  processors: Processor[];
  buses: Bus[];
  ioapics: IoApic[];
  ioInts: Interrupt[];
  localInts: Interrupt[];
  entriesDecoded: number;
}

function sum8(mem: GuestMemory, addr: number, len: number): number {
  let s = 0;
  for (const b of mem.slice(addr, len)) s += b;
  return s & 0xff;
}

function ascii(mem: GuestMemory, addr: number, len: number): string {
  return Buffer.from(mem.slice(addr, len)).toString("latin1");
}

/** Linux's smp_scan_config: "_MP_" on 16-byte boundaries, length 1, checksum 0, rev 1 or 4. */
function scanForFloatingPointer(mem: GuestMemory, base: number, length: number): number | undefined {
  for (let a = base; a + 16 <= base + length; a += 16) {
    if (ascii(mem, a, 4) !== "_MP_") continue;
    if (mem.readU8(a + 8) !== 1) continue;
    if (sum8(mem, a, 16) !== 0) continue;
    const rev = mem.readU8(a + 9);
    if (rev !== 1 && rev !== 4) continue;
    return a;
  }
  return undefined;
}

function decode(mem: GuestMemory): Decoded {
  // Find the EBDA the way Linux's get_bios_ebda() does: the segment word at 0x40E.
  const ebda = mem.readU16(0x40e) << 4;
  assert.notEqual(ebda, 0, "BDA holds no EBDA segment");
  const fpAddr = scanForFloatingPointer(mem, ebda, 0x400);
  assert.ok(fpAddr !== undefined, `no MP floating pointer in the first KiB of the EBDA at 0x${ebda.toString(16)}`);
  const tableAddr = mem.readU32(fpAddr + 4);
  const feature1 = mem.readU8(fpAddr + 11);
  const feature2 = mem.readU8(fpAddr + 12);

  // smp_check_mpc.
  assert.equal(ascii(mem, tableAddr, 4), "PCMP");
  const tableLength = mem.readU16(tableAddr + 4);
  const specRev = mem.readU8(tableAddr + 6);
  assert.equal(sum8(mem, tableAddr, tableLength), 0, "configuration table checksum");
  const d: Decoded = {
    fpAddr,
    tableAddr,
    tableLength,
    specRev,
    oem: ascii(mem, tableAddr + 8, 8),
    product: ascii(mem, tableAddr + 16, 12),
    entryCount: mem.readU16(tableAddr + 34),
    lapicAddr: mem.readU32(tableAddr + 36),
    extLength: mem.readU16(tableAddr + 40),
    feature1,
    feature2,
    processors: [],
    buses: [],
    ioapics: [],
    ioInts: [],
    localInts: [],
    entriesDecoded: 0,
  };
  assert.equal(mem.readU32(tableAddr + 28), 0, "no OEM table");

  // smp_read_mpc: walk entries until the base table length.
  let p = tableAddr + 44;
  const end = tableAddr + tableLength;
  const interrupt = (a: number): Interrupt => {
    const flags = mem.readU16(a + 2);
    return {
      irqType: mem.readU8(a + 1),
      polarity: flags & 3,
      trigger: (flags >> 2) & 3,
      srcBus: mem.readU8(a + 4),
      srcIrq: mem.readU8(a + 5),
      dstApic: mem.readU8(a + 6),
      dstPin: mem.readU8(a + 7),
    };
  };
  while (p < end) {
    const type = mem.readU8(p);
    switch (type) {
      case 0: {
        const flags = mem.readU8(p + 3);
        d.processors.push({
          apicId: mem.readU8(p + 1),
          apicVersion: mem.readU8(p + 2),
          enabled: (flags & 1) !== 0,
          bsp: (flags & 2) !== 0,
          signature: mem.readU32(p + 4),
          features: mem.readU32(p + 8),
        });
        assert.equal(mem.readU32(p + 12), 0);
        assert.equal(mem.readU32(p + 16), 0);
        p += 20;
        break;
      }
      case 1:
        d.buses.push({ id: mem.readU8(p + 1), type: ascii(mem, p + 2, 6) });
        p += 8;
        break;
      case 2:
        d.ioapics.push({
          id: mem.readU8(p + 1),
          version: mem.readU8(p + 2),
          enabled: (mem.readU8(p + 3) & 1) !== 0,
          address: mem.readU32(p + 4),
        });
        p += 8;
        break;
      case 3:
        d.ioInts.push(interrupt(p));
        p += 8;
        break;
      case 4:
        d.localInts.push(interrupt(p));
        p += 8;
        break;
      default:
        assert.fail(`unknown MP table entry type ${type} at 0x${p.toString(16)}`);
    }
    d.entriesDecoded++;
  }
  assert.equal(p, end, "last entry runs past the base table length");
  return d;
}

// ---------------------------------------------------------------------------------------

const PCI_IRQS: PciIrq[] = [
  { device: 1, pin: 0, ioapicPin: 16 },
  { device: 2, pin: 0, ioapicPin: 17 },
  { device: 3, pin: 1, ioapicPin: 18 },
  { device: 31, pin: 3, ioapicPin: 23 },
];

function checkTables(cpus: number, pciIrqs: PciIrq[]): void {
  const mem = GuestMemory.forTest(64 * MiB);
  mem.fill(0x9f000, 0x1000, 0xa5); // stale bytes must not matter
  const loc = writeMpTable(mem, { cpus, pciIrqs });
  const d = decode(mem);

  assert.equal(mem.readU16(0x40e), 0x9fc0);
  assert.equal(d.fpAddr, 0x9fc00);
  assert.equal(loc.floatingPointer, d.fpAddr);
  assert.equal(loc.configTable, d.tableAddr);
  assert.equal(loc.end, d.tableAddr + d.tableLength);
  assert.ok(loc.end <= 0x100000, "table runs past the BIOS area");
  assert.ok(d.tableAddr >= d.fpAddr + 16);

  // Floating pointer.
  assert.equal(mem.readU8(d.fpAddr + 9), 4, "MP spec 1.4");
  assert.equal(d.feature1, 0, "configuration table present");
  assert.equal(d.feature2 & 0x80, 0, "virtual wire, no IMCR");

  // Header.
  assert.equal(d.specRev, 4);
  assert.equal(d.oem, "TSKVM   ");
  assert.equal(d.lapicAddr, 0xfee00000);
  assert.equal(d.extLength, 0);
  assert.equal(d.entryCount, d.entriesDecoded);
  const expectedLength = 44 + 20 * cpus + 8 * (2 + 1 + 16 + pciIrqs.length + 2);
  assert.equal(d.tableLength, expectedLength);

  // Processors.
  assert.equal(d.processors.length, cpus);
  d.processors.forEach((c, i) => {
    assert.equal(c.apicId, i);
    assert.equal(c.enabled, true);
    assert.equal(c.bsp, i === 0, `BSP flag of CPU ${i}`);
    assert.ok(c.apicVersion >= 0x10, "integrated APIC");
    assert.equal(c.signature, 0x600);
    assert.equal(c.features & 0x201, 0x201, "FPU and APIC feature bits");
  });

  // Buses.
  assert.deepEqual(d.buses, [
    { id: 0, type: "PCI   " },
    { id: 1, type: "ISA   " },
  ]);
  const ISA = 1;
  const PCI = 0;

  // IOAPIC.
  assert.equal(d.ioapics.length, 1);
  const ioapic = d.ioapics[0]!;
  assert.equal(ioapic.id, cpus);
  assert.ok(!d.processors.some((c) => c.apicId === ioapic.id), "IOAPIC id clashes with a LAPIC id");
  assert.equal(ioapic.enabled, true);
  assert.equal(ioapic.version, 0x11);
  assert.equal(ioapic.address, 0xfec00000);

  // ISA interrupts: IRQ n -> pin n (KVM's default routing: the PIT on pin 0), no ExtINT I/O entry.
  for (const i of d.ioInts) {
    assert.equal(i.dstApic, ioapic.id, "I/O interrupt entry aimed at another IOAPIC");
    assert.ok(i.dstPin < 24, "KVM's IOAPIC has 24 pins");
  }
  const isaInts = d.ioInts.filter((i) => i.srcBus === ISA && i.irqType === 0);
  assert.equal(isaInts.length, 16);
  for (let irq = 0; irq < 16; irq++) {
    const e = isaInts.filter((i) => i.srcIrq === irq);
    assert.equal(e.length, 1, `ISA IRQ ${irq} entries`);
    assert.equal(e[0]!.dstPin, irq, `ISA IRQ ${irq} pin`);
    assert.equal(e[0]!.polarity, 0, "ISA conforms to the bus");
    assert.equal(e[0]!.trigger, 0, "ISA conforms to the bus");
  }
  assert.equal(d.ioInts.filter((i) => i.irqType === 3).length, 0, "no ExtINT I/O entry");

  // PCI interrupts: level-triggered, active low.
  const pciInts = d.ioInts.filter((i) => i.srcBus === PCI);
  assert.equal(pciInts.length, pciIrqs.length);
  for (const want of pciIrqs) {
    const e = pciInts.find((i) => i.srcIrq >> 2 === want.device && (i.srcIrq & 3) === want.pin);
    assert.ok(e, `PCI device ${want.device} pin ${want.pin} missing`);
    assert.equal(e.irqType, 0);
    assert.equal(e.dstPin, want.ioapicPin);
    assert.equal(e.polarity, 3, "active low");
    assert.equal(e.trigger, 3, "level");
  }
  assert.equal(d.ioInts.length, 16 + pciIrqs.length);

  // Local interrupts: LINT0 ExtINT and LINT1 NMI on every LAPIC.
  assert.equal(d.localInts.length, 2);
  const lint0 = d.localInts.find((i) => i.dstPin === 0);
  const lint1 = d.localInts.find((i) => i.dstPin === 1);
  assert.ok(lint0 && lint1);
  assert.equal(lint0.irqType, 3);
  assert.equal(lint0.srcBus, ISA);
  assert.equal(lint0.srcIrq, 0);
  assert.equal(lint0.dstApic, 0xff);
  assert.equal(lint1.irqType, 1);
  assert.equal(lint1.dstApic, 0xff);

  // The whole thing lies in an e820 reserved range.
  const e820 = buildE820(mem.regions);
  const holder = e820.find((e) => e.addr <= d.fpAddr && loc.end <= e.addr + e.size);
  assert.ok(holder, "MP tables are not inside one e820 entry");
  assert.equal(holder.type, E820_RESERVED);
}

for (const cpus of [1, 2, 4, 32]) {
  test(`MP tables for ${cpus} vCPU(s) decode and check out`, () => {
    checkTables(cpus, []);
    checkTables(cpus, PCI_IRQS);
  });
}

test("the maximum vCPU count fits, with and without PCI interrupt entries", () => {
  assert.equal(MAX_MPTABLE_CPUS, maxMpTableCpus(0));
  assert.equal(MAX_MPTABLE_CPUS, 254, "8-bit APIC ids, with room for the IOAPIC's");
  checkTables(MAX_MPTABLE_CPUS, []);
  checkTables(maxMpTableCpus(PCI_IRQS.length), PCI_IRQS);
  assert.equal(maxMpTableCpus(PCI_IRQS.length), MAX_MPTABLE_CPUS, "PCI entries fit beside 254 vCPUs");
});

test("more vCPUs than fit are refused with a clear error", () => {
  const mem = GuestMemory.forTest(64 * MiB);
  assert.throws(
    () => writeMpTable(mem, { cpus: MAX_MPTABLE_CPUS + 1 }),
    (e: unknown) => e instanceof MpTableError && /cannot be described/.test(e.message) && /at most 254 vCPUs/.test(e.message),
  );
  const n = maxMpTableCpus(PCI_IRQS.length) + 1;
  assert.throws(() => writeMpTable(mem, { cpus: n, pciIrqs: PCI_IRQS }), MpTableError);
  // Nothing was written.
  assert.equal(mem.readU16(0x40e), 0);
  assert.equal(mem.readU32(0x9fc00), 0);
});

test("invalid options are refused", () => {
  const mem = GuestMemory.forTest(64 * MiB);
  const bad: Parameters<typeof writeMpTable>[1][] = [
    { cpus: 0 },
    { cpus: 1.5 },
    { cpus: 4, ioapicId: 3 }, // a LAPIC id
    { cpus: 4, ioapicId: 255 },
    { cpus: 1, pciIrqs: [{ device: 32, pin: 0, ioapicPin: 16 }] },
    { cpus: 1, pciIrqs: [{ device: 1, pin: 4, ioapicPin: 16 }] },
    { cpus: 1, pciIrqs: [{ device: 1, pin: 0, ioapicPin: 24 }] },
    {
      cpus: 1,
      pciIrqs: [
        { device: 1, pin: 0, ioapicPin: 16 },
        { device: 1, pin: 0, ioapicPin: 17 },
      ],
    },
  ];
  for (const opts of bad) assert.throws(() => writeMpTable(mem, opts), MpTableError, JSON.stringify(opts));
});

test("an explicit IOAPIC id is used by the IOAPIC and every I/O interrupt entry", () => {
  const mem = GuestMemory.forTest(64 * MiB);
  writeMpTable(mem, { cpus: 2, ioapicId: 9, pciIrqs: PCI_IRQS });
  const d = decode(mem);
  assert.equal(d.ioapics[0]!.id, 9);
  assert.ok(d.ioInts.every((i) => i.dstApic === 9));
});

test("rewriting with fewer vCPUs leaves no stale entries behind", () => {
  const mem = GuestMemory.forTest(64 * MiB);
  writeMpTable(mem, { cpus: 8, pciIrqs: PCI_IRQS });
  const loc = writeMpTable(mem, { cpus: 1 });
  const d = decode(mem);
  assert.equal(d.processors.length, 1);
  assert.ok(mem.slice(loc.end, 0x100000 - loc.end).every((b) => b === 0), "nothing stale after the table");
  assert.ok(mem.slice(0x9fc10, 0xa0000 - 0x9fc10).every((b) => b === 0), "nothing stale in the EBDA");
});
