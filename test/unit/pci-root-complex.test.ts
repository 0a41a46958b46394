import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Bus } from "../../src/devices/bus";
import {
  PCI_BAR0,
  PCI_COMMAND,
  PCI_COMMAND_IO,
  PCI_COMMAND_MEMORY,
  PCI_INTERRUPT_LINE,
  PciConfigSpace,
} from "../../src/devices/pci/config-space";
import {
  PCI_CONFIG_ADDRESS_PORT,
  PCI_IO_WINDOW_END,
  PCI_IO_WINDOW_START,
  PCI_MMIO_WINDOW_END,
  PCI_MMIO_WINDOW_START,
  PciRootComplex,
} from "../../src/devices/pci/root-complex";
import { PciBarAllocator } from "../../src/devices/pci/bar-allocator";
import type { BarInfo, PciFunction } from "../../src/devices/pci/types";

/** A function with an I/O BAR 0, a 32-bit BAR 1 and a 64-bit BAR 2; it logs BAR accesses. */
class FakeFunction implements PciFunction {
  readonly config: PciConfigSpace;
  readonly log: string[] = [];

  constructor(
    readonly name: string,
    intxPin = 0,
  ) {
    this.config = PciConfigSpace.create({ vendorId: 0x1234, deviceId: 0x5678, classCode: 0xff0000, intxPin });
    this.config.defineBar(0, "io", 0x20);
    this.config.defineBar(1, "mem32", 0x1000);
    this.config.defineBar(2, "mem64", 0x4000);
  }

  configRead(offset: number, data: Uint8Array): void {
    this.config.read(offset, data);
  }

  configWrite(offset: number, data: Uint8Array): void {
    this.config.write(offset, data);
  }

  bars(): readonly BarInfo[] {
    return this.config.bars();
  }

  barRead(bar: number, offset: number, data: Uint8Array): void {
    this.log.push(`r${bar}:${offset.toString(16)}/${data.length}`);
    data.fill(bar + 0x10);
  }

  barWrite(bar: number, offset: number, data: Uint8Array): void {
    this.log.push(`w${bar}:${offset.toString(16)}=${[...data].map((b) => b.toString(16)).join(",")}`);
  }
}

function le(value: number, size: number): Uint8Array {
  const d = new Uint8Array(size);
  for (let i = 0; i < size; i++) d[i] = (value >>> (8 * i)) & 0xff;
  return d;
}

function value(d: Uint8Array): number {
  let v = 0;
  for (let i = d.length - 1; i >= 0; i--) v = v * 256 + d[i]!;
  return v;
}

class Machine {
  readonly pio = new Bus("port I/O", 0x10000);
  readonly mmio = new Bus("MMIO");
  readonly root = new PciRootComplex(PciRootComplex.createState());

  constructor() {
    this.root.registerOn(this.pio, this.mmio);
  }

  inl(port: number): number {
    const d = new Uint8Array(4);
    this.pio.read(port, d);
    return value(d);
  }

  in(port: number, size: number): number {
    const d = new Uint8Array(size);
    this.pio.read(port, d);
    return value(d);
  }

  out(port: number, size: number, v: number): void {
    this.pio.write(port, le(v, size));
  }

  /** A config read the way Linux's pci_conf1_read does it. */
  cfgRead(dev: number, reg: number, size: number, bus = 0, fn = 0): number {
    this.out(0xcf8, 4, 0x8000_0000 | (bus << 16) | (dev << 11) | (fn << 8) | (reg & 0xfc));
    return this.in(0xcfc + (reg & 3), size);
  }

  cfgWrite(dev: number, reg: number, size: number, v: number): void {
    this.out(0xcf8, 4, 0x8000_0000 | (dev << 11) | (reg & 0xfc));
    this.out(0xcfc + (reg & 3), size, v);
  }

  mmioRead(address: number, size: number): number {
    const d = new Uint8Array(size);
    this.mmio.read(address, d);
    return value(d);
  }
}

describe("PCI root complex: configuration mechanism #1", () => {
  it("keeps the address register, with reserved and low bits masked", () => {
    const m = new Machine();
    m.out(0xcf8, 4, 0x8000_0000);
    assert.equal(m.inl(0xcf8), 0x8000_0000, "Linux's pci_check_type1 reads this back");
    m.out(0xcf8, 4, 0xffff_ffff);
    assert.equal(m.inl(0xcf8), 0x80ff_fffc);
    m.out(0xcfb, 1, 0x01); // a byte write is not the address register
    m.out(0xcf8, 2, 0x1234);
    assert.equal(m.inl(0xcf8), 0x80ff_fffc);
    assert.equal(m.in(0xcf9, 1), 0xff);
  });

  it("shares the address register between threads' root complexes", () => {
    const state = PciRootComplex.createState();
    const cpu0 = new PciRootComplex(state);
    const cpu1 = new PciRootComplex(state);
    cpu0.write(0, le(0x8000_0008, 4));
    const d = new Uint8Array(4);
    cpu1.read(0, d);
    assert.equal(value(d), 0x8000_0008);
    cpu1.read(4, d);
    assert.equal(value(d) >>> 8, 0x060000, "the other thread reads the register this one selected");
  });

  it("shows a host bridge at 00:00.0", () => {
    const m = new Machine();
    assert.equal(m.cfgRead(0, 0, 4), 0x29c0_8086);
    assert.equal(m.cfgRead(0, 0x08, 4) >>> 8, 0x060000, "class: bridge, host");
    assert.equal(m.cfgRead(0, 0x0e, 1), 0, "single function");
    assert.equal(m.cfgRead(0, 0x10, 4), 0, "no BARs");
    assert.equal(m.cfgRead(0, 0x3d, 1), 0, "no INTx");
  });

  it("serves every access size at every data-port offset", () => {
    const m = new Machine();
    m.out(0xcf8, 4, 0x8000_0000); // 00:00.0 register 0: 86 80 c0 29
    assert.equal(m.in(0xcfc, 1), 0x86);
    assert.equal(m.in(0xcfd, 1), 0x80);
    assert.equal(m.in(0xcfe, 1), 0xc0);
    assert.equal(m.in(0xcff, 1), 0x29);
    assert.equal(m.in(0xcfc, 2), 0x8086);
    assert.equal(m.in(0xcfe, 2), 0x29c0);
    assert.equal(m.in(0xcfd, 2), 0xc080, "misaligned word");
    assert.equal(m.in(0xcfc, 4), 0x29c0_8086);
    // Register 0x3c + byte 0..3, written through each port.
    m.out(0xcf8, 4, 0x8000_003c);
    m.out(0xcfc, 1, 0x0b);
    assert.equal(m.cfgRead(0, 0x3c, 1), 0x0b);
    m.cfgWrite(0, 0x0c, 2, 0x2010);
    assert.equal(m.cfgRead(0, 0x0c, 4) & 0xffff, 0x2010);
    assert.equal(m.cfgRead(0, 0x0d, 1), 0x20);
  });

  it("answers all-ones for absent devices, other functions and buses, and with enable clear", () => {
    const m = new Machine();
    m.root.add({ device: 3, intxPin: 0, gsi: 16 }, new FakeFunction("fake", 0));
    assert.equal(m.cfgRead(3, 0, 4), 0x5678_1234);
    assert.equal(m.cfgRead(4, 0, 4), 0xffff_ffff, "no device in slot 4");
    assert.equal(m.cfgRead(31, 0, 2), 0xffff);
    assert.equal(m.cfgRead(3, 0, 4, 0, 1), 0xffff_ffff, "function 1");
    assert.equal(m.cfgRead(3, 0, 4, 1, 0), 0xffff_ffff, "bus 1");
    m.out(0xcf8, 4, 3 << 11); // enable bit clear
    assert.equal(m.inl(0xcfc), 0xffff_ffff);
    m.out(0xcfc, 4, 0); // dropped
    assert.equal(m.cfgRead(3, 0, 4), 0x5678_1234);
  });

  it("refuses bad slots", () => {
    const m = new Machine();
    m.root.add({ device: 1, intxPin: 0, gsi: 16 }, new FakeFunction("a", 0));
    assert.throws(() => m.root.add({ device: 0, intxPin: 0, gsi: 16 }, new FakeFunction("b")), /host bridge/);
    assert.throws(() => m.root.add({ device: 32, intxPin: 0, gsi: 16 }, new FakeFunction("b")), RangeError);
    assert.throws(() => m.root.add({ device: 1, intxPin: 0, gsi: 16 }, new FakeFunction("b")), /taken by a/);
    assert.throws(() => m.root.add({ device: 2, intxPin: 1, gsi: 17 }, new FakeFunction("b", 0)), /pin/);
    assert.equal(m.root.function(1)?.name, "a");
    assert.equal(m.root.functions().length, 2);
  });
});

describe("PCI root complex: resources and BAR routing", () => {
  it("assigns naturally aligned BARs in the windows, turns on decoding and writes the IRQ line", () => {
    const m = new Machine();
    const a = new FakeFunction("a", 0);
    const b = new FakeFunction("b", 1);
    m.root.add({ device: 1, intxPin: 0, gsi: 16 }, a);
    m.root.add({ device: 2, intxPin: 1, gsi: 17 }, b);
    m.root.assignResources();
    for (const fn of [a, b]) {
      for (const bar of fn.bars()) {
        assert.ok(bar.enabled, `${fn.name} BAR ${bar.index}`);
        assert.equal(bar.address % bar.size, 0, "naturally aligned");
        const [lo, hi] = bar.kind === "io" ? [PCI_IO_WINDOW_START, PCI_IO_WINDOW_END] : [PCI_MMIO_WINDOW_START, PCI_MMIO_WINDOW_END];
        assert.ok(bar.address >= lo && bar.address + bar.size <= hi);
      }
      assert.equal(fn.config.command() & 3, PCI_COMMAND_IO | PCI_COMMAND_MEMORY);
    }
    assert.equal(a.config.readValue(PCI_INTERRUPT_LINE, 1), 16);
    assert.equal(b.config.readValue(PCI_INTERRUPT_LINE, 1), 17);
    // No two BARs overlap.
    const all = [a, b].flatMap((f) => f.bars());
    for (const x of all) {
      for (const y of all) {
        if (x !== y && (x.kind === "io") === (y.kind === "io")) {
          assert.ok(x.address + x.size <= y.address || y.address + y.size <= x.address, "overlap");
        }
      }
    }
    // The largest memory BAR went first.
    assert.equal(a.bars()[2]!.address, PCI_MMIO_WINDOW_START);
  });

  it("routes MMIO and port accesses to the BAR that contains them", () => {
    const m = new Machine();
    const a = new FakeFunction("a", 0);
    m.root.add({ device: 1, intxPin: 0, gsi: 16 }, a);
    m.root.assignResources();
    const [io, mem32, mem64] = a.bars();
    assert.equal(m.mmioRead(mem32!.address + 0x10, 4), 0x1111_1111);
    assert.equal(m.mmioRead(mem64!.address + 0x3ffc, 2), 0x1212);
    m.mmio.write(mem64!.address + 0x3000, Uint8Array.of(1, 0));
    m.pio.write(io!.address + 0x12, Uint8Array.of(7, 0));
    assert.equal(m.in(io!.address + 0x1f, 1), 0x10);
    assert.deepEqual(a.log, ["r1:10/4", "r2:3ffc/2", "w2:3000=1,0", "w0:12=7,0", "r0:1f/1"]);
    // In the window, outside every BAR.
    assert.equal(m.mmioRead(PCI_MMIO_WINDOW_END - 8, 4), 0xffff_ffff);
    assert.equal(m.in(PCI_IO_WINDOW_END - 2, 2), 0xffff);
    assert.equal(m.root.mmioRouter.misses, 1);
  });

  it("follows a BAR the guest moves, and stops decoding when the command bit is cleared", () => {
    const m = new Machine();
    const a = new FakeFunction("a", 0);
    m.root.add({ device: 5, intxPin: 0, gsi: 16 }, a);
    m.root.assignResources();
    const old = a.bars()[1]!.address;
    const moved = 0xf000_0000;
    // Linux-style: disable decoding, size, program, re-enable.
    const command = m.cfgRead(5, PCI_COMMAND, 2);
    m.cfgWrite(5, PCI_COMMAND, 2, command & ~PCI_COMMAND_MEMORY);
    assert.equal(m.mmioRead(old, 4), 0xffff_ffff, "decode off");
    m.cfgWrite(5, PCI_BAR0 + 4, 4, 0xffff_ffff);
    assert.equal(m.cfgRead(5, PCI_BAR0 + 4, 4), 0xffff_f000);
    m.cfgWrite(5, PCI_BAR0 + 4, 4, moved);
    m.cfgWrite(5, PCI_COMMAND, 2, command);
    assert.equal(m.mmioRead(old, 4), 0xffff_ffff, "nothing at the old address");
    assert.equal(m.mmioRead(moved + 4, 4), 0x1111_1111);
    assert.deepEqual(a.log, ["r1:4/4"]);
    // I/O decode off: the I/O BAR is gone, memory BARs stay.
    m.cfgWrite(5, PCI_COMMAND, 2, PCI_COMMAND_MEMORY);
    assert.equal(m.in(a.bars()[0]!.address, 1), 0xff);
    assert.equal(m.mmioRead(moved, 1), 0x11);
  });

  it("claims its ports and windows on the buses", () => {
    const m = new Machine();
    const names = [...m.pio.list(), ...m.mmio.list()].map((r) => [r.name, r.base, r.length]);
    assert.deepEqual(names, [
      ["PCI config (0xcf8)", PCI_CONFIG_ADDRESS_PORT, 8],
      ["PCI I/O window", PCI_IO_WINDOW_START, PCI_IO_WINDOW_END - PCI_IO_WINDOW_START],
      ["PCI MMIO window", PCI_MMIO_WINDOW_START, PCI_MMIO_WINDOW_END - PCI_MMIO_WINDOW_START],
    ]);
  });
});

describe("PCI BAR allocator", () => {
  it("aligns naturally and reports a full window", () => {
    const a = new PciBarAllocator("memory", 0x1000, 0x10000);
    assert.equal(a.allocate(0x100), 0x1000);
    assert.equal(a.allocate(0x2000), 0x2000);
    assert.equal(a.allocate(0x100), 0x4000);
    assert.equal(a.allocate(0x8000), 0x8000);
    assert.throws(() => a.allocate(0x1000), /no room/);
  });
});
