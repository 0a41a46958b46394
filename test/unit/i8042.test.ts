import { describe, it } from "node:test";
import assert from "node:assert/strict";
import type { IrqLine, VmControl } from "../../src/devices/device";
import {
  I8042,
  I8042_PORT_COUNT,
  CTR_AUXDIS,
  CTR_DEFAULT,
  CTR_KBDDIS,
  CTR_KBDINT,
  CTR_XLATE,
  STATUS_AUXDATA,
  STATUS_IBF,
  STATUS_OBF,
  STATUS_SYS,
  STATUS_TIMEOUT,
  STATUS_UNLOCKED,
} from "../../src/devices/legacy/i8042";

const DATA = 0; // port 0x60
const PORT_B = 1; // port 0x61
const CMD = 4; // port 0x64

class Control implements VmControl {
  readonly resets: string[] = [];
  requestReset(reason: string): void {
    this.resets.push(reason);
  }
  guestPanicked(): void {
    assert.fail("the i8042 reports no panic");
  }
}

function make(kbdIrq?: IrqLine, nanoClock?: () => bigint) {
  const state = I8042.createState();
  const control = new Control();
  const kbc = new I8042(state, control, kbdIrq, nanoClock ? { nanoClock } : {});
  return { kbc, control, state };
}

function inb(dev: I8042, port: number): number {
  const d = new Uint8Array(1);
  dev.read(port, d);
  return d[0]!;
}

function outb(dev: I8042, port: number, value: number): void {
  dev.write(port, Uint8Array.of(value));
}

/** What Linux's i8042_command does: command, parameter bytes, then poll OBF for results. */
function command(dev: I8042, cmd: number, params: number[] = [], results = 0): number[] {
  assert.equal(inb(dev, CMD) & STATUS_IBF, 0, "input buffer must be empty");
  outb(dev, CMD, cmd);
  for (const p of params) {
    assert.equal(inb(dev, CMD) & STATUS_IBF, 0);
    outb(dev, DATA, p);
  }
  const out: number[] = [];
  for (let i = 0; i < results; i++) {
    assert.equal(inb(dev, CMD) & STATUS_OBF, STATUS_OBF, `command 0x${cmd.toString(16)}: no answer`);
    out.push(inb(dev, DATA));
  }
  return out;
}

describe("i8042 controller", () => {
  it("idles with an empty buffer, keyboard unlocked and the system flag set", () => {
    const { kbc } = make();
    const status = inb(kbc, CMD);
    assert.equal(status & (STATUS_OBF | STATUS_IBF), 0);
    assert.equal(status, STATUS_UNLOCKED | STATUS_SYS);
  });

  it("resets the VM on 0xFE, exactly once", () => {
    const { kbc, control, state } = make();
    assert.equal(kbc.resetRequested, false);
    outb(kbc, CMD, 0xfe);
    assert.deepEqual(control.resets, ["i8042 reset (guest reboot)"]);
    assert.equal(kbc.resetRequested, true);
    // Linux's reboot loop writes it ten times; another vCPU's object shares the latch.
    for (let i = 0; i < 9; i++) outb(kbc, CMD, 0xfe);
    const other = new Control();
    outb(new I8042(state.buffer, other), CMD, 0xfe);
    assert.deepEqual(control.resets, ["i8042 reset (guest reboot)"]);
    assert.deepEqual(other.resets, []);
  });

  it("resets on the other reset-line pulses and on output-port bit 0, not otherwise", () => {
    for (const cmd of [0xf0, 0xf2, 0xfc]) {
      const { kbc, control } = make();
      outb(kbc, CMD, cmd);
      assert.equal(control.resets.length, 1, `0x${cmd.toString(16)}`);
    }
    const { kbc, control } = make();
    outb(kbc, CMD, 0xff); // pulses nothing
    assert.equal(control.resets.length, 0);
    assert.deepEqual(command(kbc, 0xd0, [], 1), [0x03], "output port: reset high, A20 on");
    command(kbc, 0xd1, [0x03]);
    assert.equal(control.resets.length, 0);
    command(kbc, 0xd1, [0x02]);
    assert.equal(control.resets.length, 1);
  });

  it("answers the self and interface tests", () => {
    const { kbc } = make();
    assert.deepEqual(command(kbc, 0xaa, [], 1), [0x55]);
    assert.deepEqual(command(kbc, 0xab, [], 1), [0x00]);
    assert.deepEqual(command(kbc, 0xa4, [], 1), [0xf1]);
    assert.equal(inb(kbc, CMD) & STATUS_OBF, 0, "reading the answer empties the buffer");
  });

  it("reads and writes the command byte (CTR)", () => {
    const { kbc } = make();
    assert.deepEqual(command(kbc, 0x20, [], 1), [CTR_DEFAULT]);
    assert.equal(CTR_DEFAULT & CTR_XLATE, CTR_XLATE, "translated mode, as a BIOS leaves it");
    command(kbc, 0x60, [0x30]);
    assert.deepEqual(command(kbc, 0x20, [], 1), [0x30]);
    assert.equal(inb(kbc, CMD) & STATUS_SYS, 0, "status SYS follows CTR bit 2");
    command(kbc, 0x60, [0x34]);
    assert.equal(inb(kbc, CMD) & STATUS_SYS, STATUS_SYS);
  });

  it("flips the CTR disable bits on 0xA7/0xA8/0xAD/0xAE (Linux's bit assignment test)", () => {
    const { kbc } = make();
    command(kbc, 0xa7);
    assert.equal(command(kbc, 0x20, [], 1)[0]! & CTR_AUXDIS, CTR_AUXDIS);
    command(kbc, 0xa8);
    assert.equal(command(kbc, 0x20, [], 1)[0]! & CTR_AUXDIS, 0);
    command(kbc, 0xad);
    assert.equal(command(kbc, 0x20, [], 1)[0]! & CTR_KBDDIS, CTR_KBDDIS);
    command(kbc, 0xae);
    assert.equal(command(kbc, 0x20, [], 1)[0]! & CTR_KBDDIS, 0);
  });

  it("tells i8042_check_aux there is no AUX port without a timeout", () => {
    const { kbc } = make();
    // AUX loopback: the byte comes back, but not flagged as AUX data -> Linux: "auxerr".
    outb(kbc, CMD, 0xd3);
    outb(kbc, DATA, 0x5a);
    const status = inb(kbc, CMD);
    assert.equal(status & STATUS_OBF, STATUS_OBF);
    assert.equal(status & STATUS_AUXDATA, 0);
    // AUX test then reports an error code Linux does not excuse (not 0, 0xfa or 0xff).
    const [result] = command(kbc, 0xa9, [], 1);
    assert.ok(result !== 0 && result !== 0xfa && result !== 0xff, `aux test 0x${result!.toString(16)}`);
    // Keyboard loopback echoes too.
    assert.deepEqual(command(kbc, 0xd2, [0x42], 1), [0x42]);
    // A byte for the (absent) mouse goes nowhere.
    command(kbc, 0xd4, [0xf2]);
    assert.equal(inb(kbc, CMD) & STATUS_OBF, 0);
  });

  it("answers a byte for the absent keyboard with 0xFE and the time-out bit, on IRQ 1", () => {
    const levels: boolean[] = [];
    const { kbc } = make({ set: (l) => levels.push(l) });
    outb(kbc, DATA, 0xf2); // atkbd's GETID
    const status = inb(kbc, CMD);
    assert.equal(status & (STATUS_OBF | STATUS_TIMEOUT), STATUS_OBF | STATUS_TIMEOUT);
    assert.deepEqual(levels, [true], "CTR_DEFAULT enables the keyboard interrupt");
    assert.equal(inb(kbc, DATA), 0xfe);
    assert.deepEqual(levels, [true, false]);
    assert.equal(inb(kbc, CMD) & (STATUS_OBF | STATUS_TIMEOUT), 0);
    // Reading again repeats the last byte, without raising anything.
    assert.equal(inb(kbc, DATA), 0xfe);
    // With the keyboard interrupt off in CTR, the same answer comes without an IRQ.
    command(kbc, 0x60, [CTR_DEFAULT & ~CTR_KBDINT]);
    outb(kbc, DATA, 0xed);
    assert.equal(inb(kbc, CMD) & STATUS_OBF, STATUS_OBF);
    assert.deepEqual(levels, [true, false]);
    inb(kbc, DATA);
  });

  it("does not need an IRQ line", () => {
    const { kbc } = make();
    outb(kbc, DATA, 0xff);
    assert.equal(inb(kbc, DATA), 0xfe);
  });

  it("accepts unknown commands harmlessly", () => {
    const { kbc, control } = make();
    for (const cmd of [0x00, 0x10, 0x90, 0xa1, 0xa5, 0xc1, 0xe0]) outb(kbc, CMD, cmd);
    assert.equal(control.resets.length, 0);
    assert.deepEqual(command(kbc, 0xaa, [], 1), [0x55], "still answering");
  });

  it("models port 0x61 (offset 1): writable low bits, refresh toggling, OUT2 high", () => {
    let ns = 0n;
    const { kbc } = make(undefined, () => ns);
    assert.equal(inb(kbc, PORT_B), 0x20);
    outb(kbc, PORT_B, 0x03); // gate 2 on, speaker on
    assert.equal(inb(kbc, PORT_B), 0x23);
    outb(kbc, PORT_B, 0xfc); // only bits 0-3 are writable
    assert.equal(inb(kbc, PORT_B), 0x2c);
    ns = 1n << 14n;
    assert.equal(inb(kbc, PORT_B) & 0x10, 0x10, "refresh bit follows the clock");
    ns = 2n << 14n;
    assert.equal(inb(kbc, PORT_B) & 0x10, 0);
    // With the real clock the refresh bit toggles within a short while.
    const live = make().kbc;
    const first = inb(live, PORT_B) & 0x10;
    const deadline = Date.now() + 1000;
    while ((inb(live, PORT_B) & 0x10) === first) assert.ok(Date.now() < deadline, "refresh bit stuck");
  });

  it("spans 0x60..0x64 with the gaps reading as an empty bus", () => {
    const { kbc } = make();
    assert.equal(I8042_PORT_COUNT, 5);
    assert.equal(inb(kbc, 2), 0xff);
    assert.equal(inb(kbc, 3), 0xff);
    outb(kbc, 2, 0x12); // dropped
    assert.equal(inb(kbc, CMD), STATUS_UNLOCKED | STATUS_SYS);
  });
});
