/**
 * The CMOS RAM and real-time clock of a PC (an MC146818 at ports 0x70/0x71): port 0 of the
 * device selects a byte (bit 7, the NMI mask on real boards, is ignored), port 1 reads or
 * writes it.
 *
 * - The clock registers are computed from the host clock (UTC) on every read, in BCD or
 *   binary and 12- or 24-hour form as register B asks. Writes to them are accepted and
 *   ignored: the guest cannot move the host's clock, and Linux only writes the RTC when told
 *   to (hwclock --systohc, NTP's 11-minute sync), so a VM's RTC simply stays host time.
 * - Register A always reads UIP = 0 (the time is never mid-update), B keeps what the guest
 *   writes, C reads 0 (no RTC interrupts are generated: no periodic, alarm or update IRQ 8),
 *   D reads VRT = 1 (battery good, RAM valid).
 * - The rest is 128 bytes of RAM, preset with the memory-size bytes a PC BIOS leaves there
 *   (QEMU's pc_cmos_init layout), since some guests size memory from them.
 *
 * Memory sizes are given to `createState()`, not the constructor: the RAM is shared and
 * guest-writable, so it is initialised exactly once, not once per thread.
 */
import type { BusDevice } from "../device";
import { SharedState } from "../shared-state";
import { adoptState, type StateLike } from "./state-like";

export const CMOS_BASE = 0x70;
export const CMOS_PORT_COUNT = 2;
export const CMOS_RAM_SIZE = 128;

// Clock and status registers.
export const RTC_SECONDS = 0x00;
export const RTC_SECONDS_ALARM = 0x01;
export const RTC_MINUTES = 0x02;
export const RTC_MINUTES_ALARM = 0x03;
export const RTC_HOURS = 0x04;
export const RTC_HOURS_ALARM = 0x05;
export const RTC_DAY_OF_WEEK = 0x06;
export const RTC_DAY_OF_MONTH = 0x07;
export const RTC_MONTH = 0x08;
export const RTC_YEAR = 0x09;
export const RTC_REG_A = 0x0a;
export const RTC_REG_B = 0x0b;
export const RTC_REG_C = 0x0c;
export const RTC_REG_D = 0x0d;
export const RTC_CENTURY = 0x32;

export const REG_A_UIP = 0x80;
/** 32.768 kHz time base, 1024 Hz periodic rate: the power-on value every OS expects. */
export const REG_A_DEFAULT = 0x26;
export const REG_B_SET = 0x80;
export const REG_B_DM_BINARY = 0x04;
export const REG_B_24H = 0x02;
/** 24-hour mode, BCD: what a PC BIOS leaves. */
export const REG_B_DEFAULT = REG_B_24H;
export const REG_D_VRT = 0x80;

// Memory-size bytes (all little-endian).
export const CMOS_BASE_MEM_LO = 0x15; // KiB below 640 KiB
export const CMOS_EXT_MEM_LO = 0x17; // KiB from 1 MiB, capped at 0xffff (63.99 MiB)
export const CMOS_EXT_MEM2_LO = 0x30; // the same, second copy
export const CMOS_MEM_ABOVE_16M_LO = 0x34; // 64 KiB units from 16 MiB to the end of low RAM
export const CMOS_MEM_ABOVE_4G_LO = 0x5b; // 64 KiB units above 4 GiB, three bytes
const CMOS_EQUIPMENT = 0x14;
const CMOS_CHECKSUM_HI = 0x2e;

const KiB = 1024;
const MiB = 1024 * KiB;

export interface CmosMemory {
  /** Guest RAM below 4 GiB, in bytes (from 0 up to the PCI hole or the end of RAM). */
  readonly lowRamBytes: number;
  /** Guest RAM from 4 GiB up, in bytes. */
  readonly highRamBytes: number;
}

export interface CmosOptions {
  /** Milliseconds since the Unix epoch; Date.now by default. Tests pin the time here. */
  readonly clock?: () => number;
}

const C_INDEX = 0;
const CELLS = 1;

export class Cmos implements BusDevice {
  static readonly CELLS = CELLS;
  static readonly EXTRA_BYTES = CMOS_RAM_SIZE;

  static createState(memory: CmosMemory): SharedState {
    const { lowRamBytes, highRamBytes } = memory;
    if (!Number.isSafeInteger(lowRamBytes) || lowRamBytes < 0 || !Number.isSafeInteger(highRamBytes) || highRamBytes < 0) {
      throw new RangeError("cmos: memory sizes must be non-negative integers");
    }
    const state = SharedState.create(CELLS, CMOS_RAM_SIZE);
    const ram = state.bytes();
    const put16 = (at: number, v: number): void => {
      ram[at] = v & 0xff;
      ram[at + 1] = (v >> 8) & 0xff;
    };
    ram[RTC_REG_A] = REG_A_DEFAULT;
    ram[RTC_REG_B] = REG_B_DEFAULT;
    ram[RTC_REG_D] = REG_D_VRT;
    // Base memory: the first 640 KiB (less if RAM is smaller, which we never allow).
    put16(CMOS_BASE_MEM_LO, Math.min(Math.floor(lowRamBytes / KiB), 640));
    // Extended memory: KiB above 1 MiB, which a 16-bit field caps just under 64 MiB.
    const ext = lowRamBytes > MiB ? Math.min(Math.floor((lowRamBytes - MiB) / KiB), 0xffff) : 0;
    put16(CMOS_EXT_MEM_LO, ext);
    put16(CMOS_EXT_MEM2_LO, ext);
    // Above 16 MiB, in 64 KiB units, up to the end of RAM below 4 GiB.
    const above16m = lowRamBytes > 16 * MiB ? Math.min(Math.floor((lowRamBytes - 16 * MiB) / (64 * KiB)), 0xffff) : 0;
    put16(CMOS_MEM_ABOVE_16M_LO, above16m);
    // Above 4 GiB, in 64 KiB units, three bytes (up to 1 TiB).
    const above4g = Math.min(Math.floor(highRamBytes / (64 * KiB)), 0xffffff);
    ram[CMOS_MEM_ABOVE_4G_LO] = above4g & 0xff;
    ram[CMOS_MEM_ABOVE_4G_LO + 1] = (above4g >> 8) & 0xff;
    ram[CMOS_MEM_ABOVE_4G_LO + 2] = (above4g >> 16) & 0xff;
    // Equipment byte: a maths coprocessor, no floppies, EGA/VGA display class.
    ram[CMOS_EQUIPMENT] = 0x02;
    // The standard checksum over 0x10..0x2d, stored big-endian at 0x2e/0x2f.
    let sum = 0;
    for (let i = 0x10; i <= 0x2d; i++) sum += ram[i]!;
    ram[CMOS_CHECKSUM_HI] = (sum >> 8) & 0xff;
    ram[CMOS_CHECKSUM_HI + 1] = sum & 0xff;
    return state;
  }

  private readonly s: SharedState;
  private readonly ram: Uint8Array;
  private readonly clock: () => number;

  constructor(state: StateLike, options: CmosOptions = {}) {
    this.s = adoptState(state, CELLS, CMOS_RAM_SIZE, "cmos");
    this.ram = this.s.bytes();
    this.clock = options.clock ?? Date.now;
  }

  read(offset: number, data: Uint8Array): void {
    for (let i = 0; i < data.length; i++) {
      const port = offset + i;
      // The index port is write-only: it reads as an empty bus.
      data[i] = port === 1 ? this.readData() : 0xff;
    }
  }

  write(offset: number, data: Uint8Array): void {
    for (let i = 0; i < data.length; i++) {
      const port = offset + i;
      if (port === 0) this.s.set(C_INDEX, data[i]! & 0x7f);
      else if (port === 1) this.writeData(data[i]!);
    }
  }

  /** Read CMOS byte `index` (0..127) as the guest would through port 0x71. */
  readRegister(index: number): number {
    const s = this.s;
    s.lock();
    try {
      return this.readLocked(index & 0x7f);
    } finally {
      s.unlock();
    }
  }

  /** Write CMOS byte `index` as the guest would through port 0x71. */
  writeRegister(index: number, value: number): void {
    const s = this.s;
    s.lock();
    try {
      this.writeLocked(index & 0x7f, value & 0xff);
    } finally {
      s.unlock();
    }
  }

  private readData(): number {
    const s = this.s;
    s.lock();
    try {
      return this.readLocked(s.get(C_INDEX));
    } finally {
      s.unlock();
    }
  }

  private writeData(value: number): void {
    const s = this.s;
    s.lock();
    try {
      this.writeLocked(s.get(C_INDEX), value);
    } finally {
      s.unlock();
    }
  }

  private readLocked(index: number): number {
    const ram = this.ram;
    switch (index) {
      case RTC_SECONDS:
      case RTC_MINUTES:
      case RTC_HOURS:
      case RTC_DAY_OF_WEEK:
      case RTC_DAY_OF_MONTH:
      case RTC_MONTH:
      case RTC_YEAR:
      case RTC_CENTURY:
        return this.clockRegister(index);
      case RTC_REG_A:
        return ram[RTC_REG_A]! & ~REG_A_UIP;
      case RTC_REG_C:
        // Interrupt flags; none are ever raised, and reading clears them anyway.
        return 0;
      case RTC_REG_D:
        return REG_D_VRT;
      default:
        return ram[index]!;
    }
  }

  private writeLocked(index: number, value: number): void {
    switch (index) {
      case RTC_SECONDS:
      case RTC_MINUTES:
      case RTC_HOURS:
      case RTC_DAY_OF_WEEK:
      case RTC_DAY_OF_MONTH:
      case RTC_MONTH:
      case RTC_YEAR:
      case RTC_CENTURY:
        // The clock follows the host; see the header.
        return;
      case RTC_REG_A:
        this.ram[RTC_REG_A] = value & ~REG_A_UIP; // UIP is read-only
        return;
      case RTC_REG_C:
      case RTC_REG_D:
        return; // read-only
      default:
        this.ram[index] = value;
    }
  }

  private clockRegister(index: number): number {
    const regB = this.ram[RTC_REG_B]!;
    const now = new Date(this.clock());
    let value: number;
    let pm = false;
    switch (index) {
      case RTC_SECONDS:
        value = now.getUTCSeconds();
        break;
      case RTC_MINUTES:
        value = now.getUTCMinutes();
        break;
      case RTC_HOURS: {
        value = now.getUTCHours();
        if ((regB & REG_B_24H) === 0) {
          // 12-hour mode: 12, 1..11 with bit 7 marking PM.
          pm = value >= 12;
          value = value % 12 || 12;
        }
        break;
      }
      case RTC_DAY_OF_WEEK:
        value = now.getUTCDay() + 1; // 1 = Sunday
        break;
      case RTC_DAY_OF_MONTH:
        value = now.getUTCDate();
        break;
      case RTC_MONTH:
        value = now.getUTCMonth() + 1;
        break;
      case RTC_YEAR:
        value = now.getUTCFullYear() % 100;
        break;
      default: // RTC_CENTURY
        value = Math.floor(now.getUTCFullYear() / 100);
    }
    const encoded = (regB & REG_B_DM_BINARY) !== 0 ? value : toBcd(value);
    return pm ? encoded | 0x80 : encoded;
  }
}

function toBcd(value: number): number {
  return ((Math.floor(value / 10) % 10) << 4) | value % 10;
}
