import { describe, it } from "node:test";
import assert from "node:assert/strict";
import {
  PCI_BAR0,
  PCI_CAPABILITY_LIST,
  PCI_CAP_ID_MSIX,
  PCI_CAP_ID_VNDR,
  PCI_COMMAND,
  PCI_COMMAND_IO,
  PCI_COMMAND_MEMORY,
  PCI_HEADER_TYPE,
  PCI_INTERRUPT_LINE,
  PCI_INTERRUPT_PIN,
  PCI_STATUS,
  PCI_STATUS_CAP_LIST,
  PciConfigSpace,
} from "../../src/devices/pci/config-space";

function make(): PciConfigSpace {
  return PciConfigSpace.create({
    vendorId: 0x1af4,
    deviceId: 0x1001,
    classCode: 0x018000,
    revision: 3,
    subsystemVendorId: 0x1af4,
    subsystemId: 2,
    intxPin: 1, // INTB
  });
}

const r = (c: PciConfigSpace, off: number, size: 1 | 2 | 4): number => c.readValue(off, size);
const w = (c: PciConfigSpace, off: number, size: 1 | 2 | 4, v: number): void => c.writeValue(off, size, v);

describe("PCI configuration space: header", () => {
  it("holds the IDs given at creation, read-only", () => {
    const c = make();
    assert.equal(r(c, 0, 4), 0x1001_1af4);
    assert.equal(r(c, 0x08, 4), 0x0180_0003, "class 01/80/00, revision 3");
    assert.equal(r(c, 0x2c, 4), 0x0002_1af4);
    assert.equal(r(c, PCI_HEADER_TYPE, 1), 0);
    assert.equal(r(c, PCI_INTERRUPT_PIN, 1), 2);
    w(c, 0, 4, 0xdead_beef);
    w(c, 0x08, 4, 0xffff_ffff);
    w(c, PCI_INTERRUPT_PIN, 1, 4);
    assert.equal(r(c, 0, 4), 0x1001_1af4);
    assert.equal(r(c, 0x08, 4), 0x0180_0003);
    assert.equal(r(c, PCI_INTERRUPT_PIN, 1), 2);
  });

  it("lets the guest write only the command bits tskvm models", () => {
    const c = make();
    assert.equal(r(c, PCI_COMMAND, 2), 0);
    w(c, PCI_COMMAND, 2, 0xffff);
    assert.equal(r(c, PCI_COMMAND, 2), 0x0407, "I/O, memory, bus master, INTx disable");
    w(c, PCI_COMMAND, 1, 0x02); // a byte write leaves the high byte alone
    assert.equal(r(c, PCI_COMMAND, 2), 0x0402);
    assert.equal(c.command(), 0x0402);
  });

  it("clears W1C status bits on 1 and keeps read-only ones", () => {
    const c = make();
    c.addCapability(PCI_CAP_ID_VNDR, new Uint8Array(2)); // sets capability list
    c.raiseStatus(0x2000 | 0x0100); // received master abort, data parity error
    assert.equal(r(c, PCI_STATUS, 2), 0x2110);
    w(c, PCI_STATUS, 2, 0x0000);
    assert.equal(r(c, PCI_STATUS, 2), 0x2110, "writing 0 clears nothing");
    w(c, PCI_STATUS, 2, 0x2000 | PCI_STATUS_CAP_LIST);
    assert.equal(r(c, PCI_STATUS, 2), 0x0110, "only the written W1C bit cleared; capability list stays");
    w(c, PCI_COMMAND, 4, 0xffff_ffff); // a dword write through command into status
    assert.equal(r(c, PCI_STATUS, 2), 0x0010);
    assert.equal(r(c, PCI_COMMAND, 2), 0x0407);
  });

  it("has writable cache line, latency and interrupt line bytes", () => {
    const c = make();
    w(c, 0x0c, 2, 0x4010);
    w(c, PCI_INTERRUPT_LINE, 2, 0xff0b); // the pin byte of this word is read-only
    assert.equal(r(c, 0x0c, 2), 0x4010);
    assert.equal(r(c, PCI_INTERRUPT_LINE, 2), 0x020b);
  });

  it("serves 1-, 2- and 4-byte accesses at any offset, all-ones outside the 256 bytes", () => {
    const c = make();
    assert.equal(r(c, 1, 1), 0x1a);
    assert.equal(r(c, 1, 2), 0x011a, "misaligned word");
    assert.equal(r(c, 1, 4), 0x0010_011a, "misaligned dword");
    assert.equal(r(c, 3, 2), 0x0010);
    assert.equal(r(c, 254, 4), 0xffff_0000, "two bytes inside, two outside");
    assert.equal(r(c, 256, 4), 0xffff_ffff);
    assert.equal(r(c, -1, 1), 0xff);
    w(c, 255, 4, 0x1234_5678); // does not throw; nothing outside exists
    w(c, 300, 4, 0x1234_5678);
    assert.equal(r(c, 255, 1), 0);
  });

  it("shares its state between objects over the same buffer", () => {
    const a = make();
    const b = new PciConfigSpace(a.state.buffer);
    w(a, PCI_COMMAND, 2, PCI_COMMAND_MEMORY);
    assert.equal(r(b, PCI_COMMAND, 2), PCI_COMMAND_MEMORY);
    assert.throws(() => new PciConfigSpace(new SharedArrayBuffer(64)), RangeError);
  });
});

describe("PCI configuration space: BARs", () => {
  it("sizes an I/O BAR: low bits read-only, bit 0 set", () => {
    const c = make();
    c.defineBar(0, "io", 0x40);
    assert.equal(r(c, PCI_BAR0, 4), 0x1);
    w(c, PCI_BAR0, 4, 0xffff_ffff);
    assert.equal(r(c, PCI_BAR0, 4), 0xffff_ffc1, "~(size - 1) | I/O bit");
    w(c, PCI_BAR0, 4, 0xc07f);
    assert.equal(r(c, PCI_BAR0, 4), 0xc041, "address bits below the size are dropped");
    const [bar] = c.bars();
    assert.deepEqual(bar, { index: 0, kind: "io", size: 0x40, address: 0xc040, enabled: false });
    w(c, PCI_COMMAND, 2, PCI_COMMAND_MEMORY);
    assert.equal(c.bars()[0]!.enabled, false, "memory decode does not enable an I/O BAR");
    w(c, PCI_COMMAND, 2, PCI_COMMAND_IO);
    assert.equal(c.bars()[0]!.enabled, true);
    w(c, PCI_BAR0, 4, 0xffff_ffff);
    assert.equal(c.bars()[0]!.enabled, false, "the sizing pattern is not an address");
  });

  it("sizes a 32-bit memory BAR, prefetchable or not", () => {
    const c = make();
    c.defineBar(1, "mem32", 0x1000);
    c.defineBar(2, "mem32", 0x10_0000, { prefetchable: true });
    w(c, PCI_BAR0 + 4, 4, 0xffff_ffff);
    w(c, PCI_BAR0 + 8, 4, 0xffff_ffff);
    assert.equal(r(c, PCI_BAR0 + 4, 4), 0xffff_f000);
    assert.equal(r(c, PCI_BAR0 + 8, 4), 0xfff0_0008);
    w(c, PCI_BAR0 + 4, 4, 0xe000_1234);
    w(c, PCI_COMMAND, 2, PCI_COMMAND_MEMORY);
    assert.deepEqual(c.bars()[0], { index: 1, kind: "mem32", size: 0x1000, address: 0xe000_1000, enabled: true });
    assert.equal(c.bars()[1]!.enabled, false, "BAR 2 still holds the sizing pattern");
  });

  it("sizes a 64-bit memory BAR across two slots", () => {
    const c = make();
    c.defineBar(4, "mem64", 0x4000);
    assert.equal(r(c, PCI_BAR0 + 16, 4), 0x4, "type 64-bit");
    w(c, PCI_BAR0 + 16, 4, 0xffff_ffff);
    w(c, PCI_BAR0 + 20, 4, 0xffff_ffff);
    assert.equal(r(c, PCI_BAR0 + 16, 4), 0xffff_c004);
    assert.equal(r(c, PCI_BAR0 + 20, 4), 0xffff_ffff);
    w(c, PCI_BAR0 + 16, 4, 0xe000_0000);
    w(c, PCI_BAR0 + 20, 4, 0x1);
    w(c, PCI_COMMAND, 2, PCI_COMMAND_MEMORY);
    assert.deepEqual(c.bars(), [{ index: 4, kind: "mem64", size: 0x4000, address: 0x1_e000_0000, enabled: true }]);
  });

  it("makes a BAR of 4 GiB or more size its high dword too", () => {
    const c = make();
    c.defineBar(0, "mem64", 2 ** 33, { prefetchable: true });
    w(c, PCI_BAR0, 4, 0xffff_ffff);
    w(c, PCI_BAR0 + 4, 4, 0xffff_ffff);
    assert.equal(r(c, PCI_BAR0, 4), 0x0000_000c);
    assert.equal(r(c, PCI_BAR0 + 4, 4), 0xffff_fffe);
  });

  it("refuses bad BAR definitions", () => {
    const c = make();
    c.defineBar(4, "mem64", 0x4000);
    assert.throws(() => c.defineBar(5, "mem32", 0x1000), /already defined/, "BAR 5 is BAR 4's upper half");
    assert.throws(() => c.defineBar(5, "mem64", 0x1000), RangeError, "no slot after BAR 5");
    assert.throws(() => c.defineBar(0, "mem32", 0x1800), RangeError, "not a power of two");
    assert.throws(() => c.defineBar(0, "io", 2), RangeError);
    assert.throws(() => c.defineBar(0, "io", 16, { prefetchable: true }), RangeError);
    assert.throws(() => c.defineBar(6, "io", 16), RangeError);
  });
});

describe("PCI configuration space: capabilities", () => {
  it("chains capabilities from 0x34 and sets the status bit", () => {
    const c = make();
    assert.equal(r(c, PCI_STATUS, 2) & PCI_STATUS_CAP_LIST, 0);
    assert.equal(r(c, PCI_CAPABILITY_LIST, 1), 0);
    const a = c.addCapability(PCI_CAP_ID_VNDR, Uint8Array.of(16, 1, 4, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8));
    const b = c.addCapability(PCI_CAP_ID_VNDR, Uint8Array.of(3, 0xaa, 0xbb)); // odd length: next is realigned
    const m = c.addCapability(PCI_CAP_ID_MSIX, new Uint8Array(10), Uint8Array.of(0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0));
    assert.equal(a, 0x40);
    assert.equal(b, 0x50);
    assert.equal(m, 0x58);
    assert.notEqual(r(c, PCI_STATUS, 2) & PCI_STATUS_CAP_LIST, 0);
    // Walk it as a driver does.
    const seen: number[][] = [];
    for (let p = r(c, PCI_CAPABILITY_LIST, 1); p !== 0; p = r(c, p + 1, 1)) seen.push([p, r(c, p, 1)]);
    assert.deepEqual(seen, [
      [0x40, PCI_CAP_ID_VNDR],
      [0x50, PCI_CAP_ID_VNDR],
      [0x58, PCI_CAP_ID_MSIX],
    ]);
    assert.deepEqual(c.capabilities(), [
      { id: 9, offset: 0x40 },
      { id: 9, offset: 0x50 },
      { id: 0x11, offset: 0x58 },
    ]);
    assert.equal(c.findCapability(PCI_CAP_ID_MSIX), 0x58);
    assert.equal(c.findCapability(0x05), 0);
    assert.equal(r(c, a + 8, 4), 0x0403_0201);
  });

  it("writes only the bits a capability's mask allows", () => {
    const c = make();
    const m = c.addCapability(PCI_CAP_ID_MSIX, Uint8Array.of(0x02, 0, 1, 0, 0, 0, 1, 8, 0, 0), Uint8Array.of(0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0));
    w(c, m, 4, 0xffff_ffff);
    assert.equal(r(c, m, 4), 0xc002_0011, "id, next and table size stay; enable and mask set");
    w(c, m + 2, 2, 0x0000);
    assert.equal(r(c, m + 2, 2), 0x0002);
  });

  it("refuses a capability that does not fit", () => {
    const c = make();
    assert.throws(() => c.addCapability(PCI_CAP_ID_VNDR, new Uint8Array(200)), /does not fit/);
    assert.throws(() => c.addCapability(PCI_CAP_ID_VNDR, new Uint8Array(4), new Uint8Array(3)), RangeError);
  });
});
