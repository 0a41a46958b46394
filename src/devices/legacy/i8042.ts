/**
 * The PS/2 controller (Intel 8042) of a PC with nothing plugged into it, plus port 0x61
 * (system control port B). Register the device at 0x60 with length 5: offset 0 is the data
 * port (0x60), offset 4 the status/command port (0x64), offset 1 port B (0x61); 0x62/0x63
 * read as an empty bus. Firecracker claims the same 0x60..0x64 block.
 *
 * What Linux needs from it:
 * - Reboot: command 0xFE (pulse the reset line) is how Linux reboots by default (after ACPI,
 *   which we do not offer). It ends the VM through VmControl.requestReset, once.
 * - The probe in drivers/input/serio/i8042.c must finish without timeouts: controller
 *   commands that answer (0x20 read CTR, 0xAA self-test -> 0x55, 0xAB port test -> 0x00, ...)
 *   put their byte in the output buffer and set OBF, and 0xA7/0xA8/0xAD/0xAE flip the CTR
 *   bits Linux's "bit assignment" test checks. The IBF bit is never set: commands take
 *   effect at once.
 * - No mouse: this controller has no AUX channel. The AUX loopback command (0xD3) hands its
 *   byte back flagged as keyboard data and the AUX interface test (0xA9) reports "clock line
 *   stuck high" (0x02), which is exactly how i8042_check_aux() decides there is no AUX port,
 *   without waiting for a timeout.
 * - No keyboard: a byte for the keyboard (a data-port write not consumed by a controller
 *   command) is answered the way an 8042 answers when no device clocks it in: 0xFE in the
 *   output buffer with the status time-out bit set. With an IRQ 1 line wired in, Linux's
 *   atkbd probe then fails in microseconds instead of after its ACK timeouts.
 * - Status bit 4 ("keyboard not inhibited") reads 1, or Linux warns "Keylock active"; bit 2
 *   (system flag) mirrors CTR bit 2 as on real parts. So "idle" status reads 0x14, not 0.
 * - The output buffer holds one byte: a new response replaces one the guest has not read.
 *
 * Port 0x61. KVM's in-kernel PIT claims 0x61 only when KVM_CREATE_PIT2 is given the
 * KVM_PIT_SPEAKER_DUMMY flag (arch/x86/kvm/i8254.c, kvm_create_pit: it then registers
 * "speaker_dev" at KVM_SPEAKER_BASE_ADDRESS = 0x61, and its read handler returns the
 * channel-2 gate, speaker enable, channel-2 OUT and a refresh bit toggling every 2^14 ns).
 * gokvm passes flags = 0, so there 0x61 exits to user space. tskvm passes
 * KVM_PIT_SPEAKER_DUMMY (createPit in src/kvm/kvm.ts), because only then does the in-kernel
 * PIT's channel-2 gate follow the guest; offset 1 here is then never reached. Without it (no
 * in-kernel PIT, or flags = 0), this minimal port B answers instead:
 * bits 0-3 keep what the guest wrote, bit 4 toggles with the host clock like KVM's refresh
 * bit, bit 5 (channel-2 OUT, which user space cannot see in the kernel's PIT) reads 1 so
 * that loops waiting for it end (Linux's pit_calibrate_tsc spins on it; reading 1 at once it
 * reports a failed PIT calibration rather than hanging, and a KVM guest takes its TSC rate
 * from kvmclock anyway), and bits 6-7 (NMI sources) read 0.
 */
import type { BusDevice, IrqLine, VmControl } from "../device";
import { SharedState } from "../shared-state";
import { adoptState, type StateLike } from "./state-like";

export const I8042_BASE = 0x60;
/** 0x60..0x64: data, port B, two unused ports, status/command. */
export const I8042_PORT_COUNT = 5;
export const I8042_KBD_IRQ = 1;

const OFF_DATA = 0;
const OFF_PORT_B = 1;
const OFF_COMMAND = 4;

// Status register bits.
export const STATUS_OBF = 0x01;
export const STATUS_IBF = 0x02;
export const STATUS_SYS = 0x04;
export const STATUS_CMD = 0x08; // last write went to the command port
export const STATUS_UNLOCKED = 0x10;
export const STATUS_AUXDATA = 0x20;
export const STATUS_TIMEOUT = 0x40;

// Controller configuration byte (CTR) bits.
export const CTR_KBDINT = 0x01;
export const CTR_AUXINT = 0x02;
export const CTR_SYS = 0x04;
export const CTR_KBDDIS = 0x10;
export const CTR_AUXDIS = 0x20;
export const CTR_XLATE = 0x40;
/** As a BIOS leaves it: keyboard port on with its interrupt, translation on, AUX off. */
export const CTR_DEFAULT = CTR_KBDINT | CTR_SYS | CTR_AUXDIS | CTR_XLATE;

// Controller commands (written to 0x64).
export const CMD_READ_CTR = 0x20;
export const CMD_WRITE_CTR = 0x60;
export const CMD_PASSWORD_TEST = 0xa4;
export const CMD_AUX_DISABLE = 0xa7;
export const CMD_AUX_ENABLE = 0xa8;
export const CMD_AUX_TEST = 0xa9;
export const CMD_SELF_TEST = 0xaa;
export const CMD_KBD_TEST = 0xab;
export const CMD_KBD_DISABLE = 0xad;
export const CMD_KBD_ENABLE = 0xae;
export const CMD_READ_INPUT_PORT = 0xc0;
export const CMD_READ_OUTPUT_PORT = 0xd0;
export const CMD_WRITE_OUTPUT_PORT = 0xd1;
export const CMD_KBD_LOOP = 0xd2;
export const CMD_AUX_LOOP = 0xd3;
export const CMD_AUX_SEND = 0xd4;
export const CMD_PULSE_RESET = 0xfe;

export const SELF_TEST_OK = 0x55;
/** Answer to a byte sent to the absent keyboard (with STATUS_TIMEOUT). */
export const NO_DEVICE_RESPONSE = 0xfe;
/** AUX interface test result: clock line stuck high, i.e. nothing there. */
const AUX_TEST_NO_PORT = 0x02;

// Output port bits: bit 0 low holds the CPU in reset, bit 1 is the A20 gate.
const OUTPUT_PORT_RESET = 0x01;
const OUTPUT_PORT_A20 = 0x02;

// Port B bits.
const PORT_B_WRITABLE = 0x0f; // gate 2, speaker data, parity/IOCHK check enables
const PORT_B_REFRESH = 0x10;
const PORT_B_OUT2 = 0x20;

const C_CTR = 0;
/** Status bits kept in state: OBF, CMD, AUXDATA, TIMEOUT (SYS and UNLOCKED are computed). */
const C_STATUS = 1;
const C_OUTPUT = 2;
/** A command waiting for its parameter byte on the data port (0 = none). */
const C_PENDING_CMD = 3;
const C_OUTPUT_PORT = 4;
const C_IRQ_LEVEL = 5;
const C_RESET_REQUESTED = 6;
const C_PORT_B = 7;
const CELLS = 8;

export interface I8042Options {
  /** Monotonic nanoseconds for port B's refresh bit; process.hrtime by default. */
  readonly nanoClock?: () => bigint;
}

export class I8042 implements BusDevice {
  static readonly CELLS = CELLS;

  static createState(): SharedState {
    const state = SharedState.create(CELLS);
    state.set(C_CTR, CTR_DEFAULT);
    state.set(C_OUTPUT_PORT, OUTPUT_PORT_RESET | OUTPUT_PORT_A20);
    return state;
  }

  private readonly s: SharedState;
  private readonly nanoClock: () => bigint;

  /**
   * `kbdIrq`, when given, is IRQ 1: raised while a keyboard-channel byte waits in the output
   * buffer and CTR enables the keyboard interrupt, as the real controller wires it.
   */
  constructor(
    state: StateLike,
    private readonly control: VmControl,
    private readonly kbdIrq?: IrqLine,
    options: I8042Options = {},
  ) {
    this.s = adoptState(state, CELLS, 0, "i8042");
    this.nanoClock = options.nanoClock ?? process.hrtime.bigint;
  }

  read(offset: number, data: Uint8Array): void {
    for (let i = 0; i < data.length; i++) data[i] = this.readPort(offset + i);
  }

  write(offset: number, data: Uint8Array): void {
    for (let i = 0; i < data.length; i++) this.writePort(offset + i, data[i]!);
  }

  /** Whether the guest has asked for a reset (0xFE and friends). */
  get resetRequested(): boolean {
    return this.s.get(C_RESET_REQUESTED) !== 0;
  }

  readPort(offset: number): number {
    switch (offset) {
      case OFF_DATA:
        return this.locked(() => this.readData());
      case OFF_COMMAND:
        return this.locked(() => this.status());
      case OFF_PORT_B: {
        const refresh = Number((this.nanoClock() >> 14n) & 1n);
        return (this.s.get(C_PORT_B) & PORT_B_WRITABLE) | (refresh ? PORT_B_REFRESH : 0) | PORT_B_OUT2;
      }
      default:
        return 0xff;
    }
  }

  writePort(offset: number, value: number): void {
    value &= 0xff;
    let reset = false;
    switch (offset) {
      case OFF_DATA:
        reset = this.locked(() => this.writeData(value));
        break;
      case OFF_COMMAND:
        reset = this.locked(() => this.writeCommand(value));
        break;
      case OFF_PORT_B:
        this.s.set(C_PORT_B, value & PORT_B_WRITABLE);
        break;
      default:
        break;
    }
    // Outside the lock: the VM may do anything to stop. Only the first request counts, so
    // Linux's ten-fold 0xFE loop (or several vCPUs) end the VM once.
    if (reset && Atomics.compareExchange(this.s.cells, C_RESET_REQUESTED + 1, 0, 1) === 0) {
      this.control.requestReset("i8042 reset (guest reboot)");
    }
  }

  private locked<T>(fn: () => T): T {
    this.s.lock();
    try {
      const result = fn();
      this.updateIrq();
      return result;
    } finally {
      this.s.unlock();
    }
  }

  private status(): number {
    const s = this.s;
    return s.get(C_STATUS) | STATUS_UNLOCKED | (s.get(C_CTR) & CTR_SYS ? STATUS_SYS : 0);
  }

  private readData(): number {
    const s = this.s;
    // Reading empties the buffer; with nothing new it repeats the last byte, as the chip does.
    s.set(C_STATUS, s.get(C_STATUS) & ~(STATUS_OBF | STATUS_AUXDATA | STATUS_TIMEOUT));
    return s.get(C_OUTPUT);
  }

  /** Put a byte in the output buffer, replacing any unread one. */
  private respond(byte: number, extraStatus = 0): void {
    const s = this.s;
    s.set(C_OUTPUT, byte & 0xff);
    const kept = s.get(C_STATUS) & STATUS_CMD;
    s.set(C_STATUS, kept | STATUS_OBF | extraStatus);
  }

  /** A data-port write: a pending command's parameter, or a byte for the keyboard. */
  private writeData(value: number): boolean {
    const s = this.s;
    s.set(C_STATUS, s.get(C_STATUS) & ~STATUS_CMD);
    const command = s.get(C_PENDING_CMD);
    s.set(C_PENDING_CMD, 0);
    switch (command) {
      case CMD_WRITE_CTR:
        s.set(C_CTR, value);
        return false;
      case CMD_WRITE_OUTPUT_PORT:
        s.set(C_OUTPUT_PORT, value);
        // Bit 0 is the CPU reset line, active low.
        return (value & OUTPUT_PORT_RESET) === 0;
      case CMD_KBD_LOOP:
      case CMD_AUX_LOOP:
        // Both come back as keyboard data: there is no AUX channel (see the header).
        this.respond(value);
        return false;
      case CMD_AUX_SEND:
        return false; // no mouse to receive it
      case 0:
        // For the keyboard, which is absent: "no response" error, like a real 8042.
        this.respond(NO_DEVICE_RESPONSE, STATUS_TIMEOUT);
        return false;
      default:
        // A write to controller RAM (0x61..0x7f): accepted, forgotten.
        return false;
    }
  }

  /** A command-port write. Returns whether it asks for a CPU reset. */
  private writeCommand(command: number): boolean {
    const s = this.s;
    s.set(C_STATUS, s.get(C_STATUS) | STATUS_CMD);
    s.set(C_PENDING_CMD, 0);
    const ctr = s.get(C_CTR);
    if (command === CMD_READ_CTR) {
      this.respond(ctr);
    } else if (command > CMD_READ_CTR && command < 0x40) {
      this.respond(0); // other controller RAM bytes
    } else if (command >= CMD_WRITE_CTR && command < 0x80) {
      s.set(C_PENDING_CMD, command === CMD_WRITE_CTR ? CMD_WRITE_CTR : 0x61);
    } else if ((command & 0xf0) === 0xf0) {
      // 0xF0..0xFF pulse output-port lines whose mask bit is 0; bit 0 is the reset line.
      return (command & 0x01) === 0;
    } else {
      switch (command) {
        case CMD_PASSWORD_TEST:
          this.respond(0xf1); // no password installed
          break;
        case CMD_AUX_DISABLE:
          s.set(C_CTR, ctr | CTR_AUXDIS);
          break;
        case CMD_AUX_ENABLE:
          s.set(C_CTR, ctr & ~CTR_AUXDIS);
          break;
        case CMD_AUX_TEST:
          this.respond(AUX_TEST_NO_PORT);
          break;
        case CMD_SELF_TEST:
          s.set(C_CTR, ctr | CTR_SYS); // a passed self-test sets the system flag
          this.respond(SELF_TEST_OK);
          break;
        case CMD_KBD_TEST:
          this.respond(0x00);
          break;
        case CMD_KBD_DISABLE:
          s.set(C_CTR, ctr | CTR_KBDDIS);
          break;
        case CMD_KBD_ENABLE:
          s.set(C_CTR, ctr & ~CTR_KBDDIS);
          break;
        case CMD_READ_INPUT_PORT:
          this.respond(0x80); // keyboard not inhibited
          break;
        case CMD_READ_OUTPUT_PORT:
          this.respond(s.get(C_OUTPUT_PORT));
          break;
        case CMD_WRITE_OUTPUT_PORT:
        case CMD_KBD_LOOP:
        case CMD_AUX_LOOP:
        case CMD_AUX_SEND:
          s.set(C_PENDING_CMD, command);
          break;
        default:
          break; // anything else is accepted and does nothing
      }
    }
    return false;
  }

  /** IRQ 1 follows "keyboard byte waiting and keyboard interrupt enabled". */
  private updateIrq(): void {
    if (this.kbdIrq === undefined) return;
    const s = this.s;
    const status = s.get(C_STATUS);
    const level = (status & STATUS_OBF) !== 0 && (status & STATUS_AUXDATA) === 0 && (s.get(C_CTR) & CTR_KBDINT) !== 0;
    if (level !== (s.get(C_IRQ_LEVEL) !== 0)) {
      s.set(C_IRQ_LEVEL, level ? 1 : 0);
      this.kbdIrq.set(level);
    }
  }
}
