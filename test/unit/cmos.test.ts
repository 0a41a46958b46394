import { describe, it } from "node:test";
import assert from "node:assert/strict";
import {
  Cmos,
  CMOS_EXT_MEM2_LO,
  CMOS_EXT_MEM_LO,
  CMOS_MEM_ABOVE_16M_LO,
  CMOS_MEM_ABOVE_4G_LO,
  CMOS_BASE_MEM_LO,
  REG_B_24H,
  REG_B_DM_BINARY,
  RTC_CENTURY,
  RTC_DAY_OF_MONTH,
  RTC_DAY_OF_WEEK,
  RTC_HOURS,
  RTC_MINUTES,
  RTC_MONTH,
  RTC_REG_A,
  RTC_REG_B,
  RTC_REG_C,
  RTC_REG_D,
  RTC_SECONDS,
  RTC_YEAR,
} from "../../src/devices/legacy/cmos";

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

/** Read CMOS byte `index` through the ports, as a guest does: out 0x70, in 0x71. */
function cmosRead(cmos: Cmos, index: number): number {
  cmos.write(0, Uint8Array.of(index));
  const d = new Uint8Array(1);
  cmos.read(1, d);
  return d[0]!;
}

function cmosWrite(cmos: Cmos, index: number, value: number): void {
  cmos.write(0, Uint8Array.of(index));
  cmos.write(1, Uint8Array.of(value));
}

function u16(cmos: Cmos, lo: number): number {
  return cmosRead(cmos, lo) | (cmosRead(cmos, lo + 1) << 8);
}

// Thursday 29 February 2024, 13:05:09 UTC.
const LEAP_DAY = Date.UTC(2024, 1, 29, 13, 5, 9);

function makeCmos(time = LEAP_DAY, lowRamBytes = 64 * MiB, highRamBytes = 0): Cmos {
  return new Cmos(Cmos.createState({ lowRamBytes, highRamBytes }), { clock: () => time });
}

const TIME_REGS = [RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH, RTC_MONTH, RTC_YEAR, RTC_CENTURY];

describe("CMOS/RTC", () => {
  it("reads the clock in BCD, 24-hour, by default", () => {
    const cmos = makeCmos();
    assert.equal(cmosRead(cmos, RTC_REG_B), REG_B_24H);
    assert.deepEqual(
      TIME_REGS.map((r) => cmosRead(cmos, r)),
      [0x09, 0x05, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20],
    );
  });

  it("reads the clock in binary when register B sets DM", () => {
    const cmos = makeCmos();
    cmosWrite(cmos, RTC_REG_B, REG_B_24H | REG_B_DM_BINARY);
    assert.equal(cmosRead(cmos, RTC_REG_B), REG_B_24H | REG_B_DM_BINARY);
    assert.deepEqual(
      TIME_REGS.map((r) => cmosRead(cmos, r)),
      [9, 5, 13, 5, 29, 2, 24, 20],
    );
  });

  it("encodes 12-hour mode with the PM flag in bit 7", () => {
    const cases: [number, number, number][] = [
      // hour (UTC), BCD, binary
      [0, 0x12, 12], // midnight is 12 AM
      [1, 0x01, 1],
      [11, 0x11, 11],
      [12, 0x92, 0x8c], // noon is 12 PM
      [13, 0x81, 0x81],
      [23, 0x91, 0x8b],
    ];
    for (const [hour, bcd, bin] of cases) {
      const cmos = makeCmos(Date.UTC(2031, 11, 31, hour, 59, 59));
      cmosWrite(cmos, RTC_REG_B, 0);
      assert.equal(cmosRead(cmos, RTC_HOURS), bcd, `BCD ${hour}h`);
      cmosWrite(cmos, RTC_REG_B, REG_B_DM_BINARY);
      assert.equal(cmosRead(cmos, RTC_HOURS), bin, `binary ${hour}h`);
    }
  });

  it("reads the host clock at every read", () => {
    let now = Date.UTC(1999, 11, 31, 23, 59, 59); // a Friday
    const cmos = new Cmos(Cmos.createState({ lowRamBytes: 64 * MiB, highRamBytes: 0 }), { clock: () => now });
    assert.deepEqual(
      TIME_REGS.map((r) => cmosRead(cmos, r)),
      [0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19],
    );
    now += 1000;
    assert.deepEqual(
      TIME_REGS.map((r) => cmosRead(cmos, r)),
      [0x00, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20],
    );
    // The real clock works too, in UTC.
    const live = new Cmos(Cmos.createState({ lowRamBytes: 64 * MiB, highRamBytes: 0 }));
    const year = new Date().getUTCFullYear() % 100;
    const bcd = cmosRead(live, RTC_YEAR);
    assert.ok((bcd >> 4) * 10 + (bcd & 0xf) === year || (bcd >> 4) * 10 + (bcd & 0xf) === (year + 1) % 100);
  });

  it("ignores writes to the clock registers", () => {
    const cmos = makeCmos();
    for (const r of TIME_REGS) cmosWrite(cmos, r, 0x42);
    assert.deepEqual(
      TIME_REGS.map((r) => cmosRead(cmos, r)),
      [0x09, 0x05, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20],
    );
  });

  it("has register A 0x26 with UIP clear, C empty and D valid", () => {
    const cmos = makeCmos();
    assert.equal(cmosRead(cmos, RTC_REG_A), 0x26);
    cmosWrite(cmos, RTC_REG_A, 0xa6); // UIP is read-only
    assert.equal(cmosRead(cmos, RTC_REG_A), 0x26);
    cmosWrite(cmos, RTC_REG_A, 0x2f);
    assert.equal(cmosRead(cmos, RTC_REG_A), 0x2f);
    assert.equal(cmosRead(cmos, RTC_REG_C), 0);
    cmosWrite(cmos, RTC_REG_C, 0xff);
    assert.equal(cmosRead(cmos, RTC_REG_C), 0);
    assert.equal(cmosRead(cmos, RTC_REG_D), 0x80);
    cmosWrite(cmos, RTC_REG_D, 0);
    assert.equal(cmosRead(cmos, RTC_REG_D), 0x80, "bit 6 must stay 0 or rtc-cmos says 'not accessible'");
  });

  it("is plain RAM elsewhere, with the index masked to 7 bits (bit 7 = NMI disable)", () => {
    const cmos = makeCmos();
    cmosWrite(cmos, 0x40, 0xab);
    assert.equal(cmosRead(cmos, 0x40), 0xab);
    assert.equal(cmosRead(cmos, 0x80 | 0x40), 0xab, "NMI-disable bit ignored");
    cmosWrite(cmos, 0x7f, 0x11);
    assert.equal(cmos.readRegister(0x7f), 0x11);
    cmos.writeRegister(0x50, 0x22);
    assert.equal(cmosRead(cmos, 0x50), 0x22);
    const d = new Uint8Array(1);
    cmos.read(0, d);
    assert.equal(d[0], 0xff, "the index port is write-only");
  });

  it("shares RAM and index between objects over the same state", () => {
    const state = Cmos.createState({ lowRamBytes: 64 * MiB, highRamBytes: 0 });
    const a = new Cmos(state, { clock: () => LEAP_DAY });
    const b = new Cmos(state.buffer, { clock: () => LEAP_DAY });
    cmosWrite(a, 0x41, 0x99);
    assert.equal(cmosRead(b, 0x41), 0x99);
    a.write(0, Uint8Array.of(0x41));
    const d = new Uint8Array(1);
    b.read(1, d);
    assert.equal(d[0], 0x99, "the index register is shared too");
    cmosWrite(b, RTC_REG_B, REG_B_24H | REG_B_DM_BINARY);
    assert.equal(cmosRead(a, RTC_SECONDS), 9);
  });

  describe("memory size registers", () => {
    it("64 MiB", () => {
      const cmos = makeCmos(LEAP_DAY, 64 * MiB, 0);
      assert.equal(u16(cmos, CMOS_BASE_MEM_LO), 640);
      assert.equal(u16(cmos, CMOS_EXT_MEM_LO), 63 * 1024); // KiB above 1 MiB
      assert.equal(u16(cmos, CMOS_EXT_MEM2_LO), 63 * 1024);
      assert.equal(u16(cmos, CMOS_MEM_ABOVE_16M_LO), (48 * MiB) / 65536);
      assert.deepEqual(
        [0, 1, 2].map((i) => cmosRead(cmos, CMOS_MEM_ABOVE_4G_LO + i)),
        [0, 0, 0],
      );
    });

    it("3 GiB: extended memory caps, above-16M counts to the end of low RAM", () => {
      const cmos = makeCmos(LEAP_DAY, 3 * GiB, 0);
      assert.equal(u16(cmos, CMOS_BASE_MEM_LO), 640);
      assert.equal(u16(cmos, CMOS_EXT_MEM_LO), 0xffff);
      assert.equal(u16(cmos, CMOS_EXT_MEM2_LO), 0xffff);
      assert.equal(u16(cmos, CMOS_MEM_ABOVE_16M_LO), (3 * GiB - 16 * MiB) / 65536);
      assert.equal(u16(cmos, CMOS_MEM_ABOVE_16M_LO), 0xbf00);
      assert.equal(cmosRead(cmos, CMOS_MEM_ABOVE_4G_LO), 0);
    });

    it("8 GiB: 3 GiB below the PCI hole, 5 GiB above 4 GiB", () => {
      const cmos = makeCmos(LEAP_DAY, 3 * GiB, 5 * GiB);
      assert.equal(u16(cmos, CMOS_EXT_MEM_LO), 0xffff);
      assert.equal(u16(cmos, CMOS_MEM_ABOVE_16M_LO), 0xbf00);
      const units = (5 * GiB) / 65536; // 0x014000
      assert.deepEqual(
        [0, 1, 2].map((i) => cmosRead(cmos, CMOS_MEM_ABOVE_4G_LO + i)),
        [units & 0xff, (units >> 8) & 0xff, units >> 16],
      );
      assert.deepEqual(
        [0, 1, 2].map((i) => cmosRead(cmos, CMOS_MEM_ABOVE_4G_LO + i)),
        [0x00, 0x40, 0x01],
      );
    });

    it("carries the standard checksum over 0x10..0x2d", () => {
      const cmos = makeCmos(LEAP_DAY, 3 * GiB, 5 * GiB);
      let sum = 0;
      for (let i = 0x10; i <= 0x2d; i++) sum += cmosRead(cmos, i);
      assert.equal((cmosRead(cmos, 0x2e) << 8) | cmosRead(cmos, 0x2f), sum);
    });

    it("rejects nonsense sizes", () => {
      assert.throws(() => Cmos.createState({ lowRamBytes: -1, highRamBytes: 0 }), RangeError);
      assert.throws(() => Cmos.createState({ lowRamBytes: 1.5, highRamBytes: 0 }), RangeError);
    });
  });
});
