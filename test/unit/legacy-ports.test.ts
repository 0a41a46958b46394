import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Bus } from "../../src/devices/bus";
import { ABSENT_PORTS, AbsentPorts } from "../../src/devices/legacy/legacy-ports";
import { Serial, COM1_BASE, SERIAL_PORT_COUNT } from "../../src/devices/legacy/serial";
import { Cmos, CMOS_BASE, CMOS_PORT_COUNT } from "../../src/devices/legacy/cmos";
import { I8042, I8042_BASE, I8042_PORT_COUNT } from "../../src/devices/legacy/i8042";

/** A port I/O bus laid out the way the machine does it. */
function legacyBus(): Bus {
  const bus = new Bus("port I/O");
  bus.register(COM1_BASE, SERIAL_PORT_COUNT, new Serial(Serial.createState(), { write: () => {} }, { set: () => {} }), "COM1");
  bus.register(CMOS_BASE, CMOS_PORT_COUNT, new Cmos(Cmos.createState({ lowRamBytes: 64 << 20, highRamBytes: 0 })), "CMOS");
  bus.register(I8042_BASE, I8042_PORT_COUNT, new I8042(I8042.createState(), { requestReset: () => {}, guestPanicked: () => {} }), "i8042");
  const absent = new AbsentPorts();
  for (const p of ABSENT_PORTS) bus.register(p.base, p.length, absent, p.name);
  return bus;
}

function ports(): number[] {
  return ABSENT_PORTS.flatMap((p) => Array.from({ length: p.length }, (_, i) => p.base + i));
}

describe("absent legacy ports", () => {
  it("read all-ones at every width and drop writes", () => {
    const dev = new AbsentPorts();
    for (const width of [1, 2, 4]) {
      const d = new Uint8Array(width);
      dev.read(0, d);
      assert.deepEqual([...d], new Array(width).fill(0xff));
    }
    dev.write(0, Uint8Array.of(0x12));
    const d = new Uint8Array(1);
    dev.read(0, d);
    assert.equal(d[0], 0xff);
  });

  it("cover the ports a Linux guest probes", () => {
    const claimed = new Set(ports());
    const expected = [
      0x80, // POST code / io_delay
      0x87, // DMA page
      0xed, // io_delay=0xed
      0x278, 0x27d, 0x378, 0x37d, // LPT
      0x3c0, 0x3d4, 0x3d5, 0x3da, 0x3df, // VGA
      0x1f0, 0x1f7, 0x170, 0x177, // IDE
      0x510, 0x511, // fw_cfg
    ];
    for (const p of expected) assert.ok(claimed.has(p), `0x${p.toString(16)} not claimed`);
  });

  it("leave the in-kernel irqchip's, PIT's and other devices' ports alone", () => {
    const claimed = new Set(ports());
    const kernelOwned = [0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x40, 0x41, 0x42, 0x43, 0x61];
    // The four UARTs: COM1 (console) and COM2..COM4 (tskvm's guest agent) are modelled.
    const uarts = [0x3f8, 0x2f8, 0x3e8, 0x2e8].flatMap((b) => Array.from({ length: 8 }, (_, i) => b + i));
    const others = [0x60, 0x64, 0x70, 0x71, ...uarts];
    const pci = Array.from({ length: 8 }, (_, i) => 0xcf8 + i);
    for (const p of [...kernelOwned, ...others, ...pci]) assert.ok(!claimed.has(p), `0x${p.toString(16)} claimed`);
  });

  it("form a sorted, non-overlapping table with names", () => {
    for (let i = 0; i < ABSENT_PORTS.length; i++) {
      const p = ABSENT_PORTS[i]!;
      assert.ok(p.length > 0 && p.name.length > 0);
      assert.ok(p.base + p.length <= 0x10000);
      if (i > 0) {
        const prev = ABSENT_PORTS[i - 1]!;
        assert.ok(prev.base + prev.length <= p.base, `${prev.name} overlaps ${p.name}`);
      }
    }
    assert.ok(Object.isFrozen(ABSENT_PORTS));
  });

  it("register next to the modelled legacy devices and answer through the bus", () => {
    const bus = legacyBus();
    const d = new Uint8Array(1);
    for (const p of ports()) {
      d[0] = 0;
      assert.equal(bus.read(p, d), true);
      assert.equal(d[0], 0xff, `0x${p.toString(16)}`);
      assert.equal(bus.write(p, Uint8Array.of(0x5a)), true);
    }
    assert.equal(bus.unclaimedReads, 0);
    assert.equal(bus.unclaimedWrites, 0);
    // An 8250-style probe of an absent port finds no UART: IER reads back 0xff, not 0.
    bus.write(0x279, Uint8Array.of(0));
    bus.read(0x279, d);
    assert.notEqual(d[0]! & 0x0f, 0);
    // ...while COM1 answers like a UART.
    bus.write(COM1_BASE + 1, Uint8Array.of(0));
    bus.read(COM1_BASE + 1, d);
    assert.equal(d[0], 0);
  });
});
