import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Worker } from "node:worker_threads";
import type { ByteSink, IrqLine } from "../../src/devices/device";
import {
  Serial,
  SERIAL_RX_FIFO_SIZE,
  UART_DLL,
  UART_DLM,
  UART_FCR,
  UART_IER,
  UART_IIR,
  UART_LCR,
  UART_LSR,
  UART_MCR,
  UART_MSR,
  UART_RBR,
  UART_SCR,
  UART_THR,
  IER_EDSSI,
  IER_ELSI,
  IER_ERBFI,
  IER_ETBEI,
  LSR_DR,
  LSR_OE,
  LSR_TEMT,
  LSR_THRE,
  MCR_LOOP,
  MCR_OUT2,
} from "../../src/devices/legacy/serial";

class Recorder {
  readonly bytes: number[] = [];
  readonly levels: boolean[] = [];
  readonly sink: ByteSink = { write: (b) => this.bytes.push(...b) };
  readonly irq: IrqLine = { set: (level) => this.levels.push(level) };
}

function makeUart(): { uart: Serial; rec: Recorder; state: ReturnType<typeof Serial.createState> } {
  const state = Serial.createState();
  const rec = new Recorder();
  return { uart: new Serial(state, rec.sink, rec.irq), rec, state };
}

function rd(uart: Serial, reg: number): number {
  const d = new Uint8Array(1);
  uart.read(reg, d);
  return d[0]!;
}

function wr(uart: Serial, reg: number, value: number): void {
  uart.write(reg, Uint8Array.of(value));
}

describe("16550A UART", () => {
  it("comes out of reset with the documented register values", () => {
    const { uart, rec } = makeUart();
    assert.equal(rd(uart, UART_IER), 0);
    assert.equal(rd(uart, UART_IIR), 0x01);
    assert.equal(rd(uart, UART_LCR), 0);
    assert.equal(rd(uart, UART_MCR), MCR_OUT2);
    assert.equal(rd(uart, UART_LSR), LSR_THRE | LSR_TEMT);
    assert.equal(rd(uart, UART_MSR), 0xb0); // CTS | DSR | DCD, no deltas
    assert.equal(rd(uart, UART_SCR), 0);
    assert.deepEqual(rec.levels, []);
    assert.equal(uart.irqLevel, false);
  });

  it("DLAB switches offsets 0/1 to the divisor latch", () => {
    const { uart, rec } = makeUart();
    wr(uart, UART_IER, 0x05);
    wr(uart, UART_LCR, 0x83); // DLAB, 8N1
    assert.equal(rd(uart, UART_LCR), 0x83);
    wr(uart, UART_DLL, 0x01); // 115200 baud
    wr(uart, UART_DLM, 0x00);
    assert.equal(rd(uart, UART_DLL), 0x01);
    assert.equal(rd(uart, UART_DLM), 0x00);
    wr(uart, UART_DLL, 0x34);
    wr(uart, UART_DLM, 0x12);
    assert.equal(rd(uart, UART_DLL), 0x34);
    assert.equal(rd(uart, UART_DLM), 0x12);
    assert.deepEqual(rec.bytes, [], "a DLL write is not a transmission");
    wr(uart, UART_LCR, 0x03);
    assert.equal(rd(uart, UART_IER), 0x05, "IER untouched by DLM writes");
    wr(uart, UART_THR, 0x41);
    assert.deepEqual(rec.bytes, [0x41]);
    wr(uart, UART_LCR, 0x83);
    assert.equal(rd(uart, UART_DLL), 0x34, "divisor kept across DLAB toggles");
    assert.equal(rd(uart, UART_DLM), 0x12);
    // IIR does not move under DLAB (Linux's EFR probe reads offset 2 with LCR 0x80/0xbf).
    assert.notEqual(rd(uart, UART_IIR), 0);
    wr(uart, UART_LCR, 0xbf);
    assert.notEqual(rd(uart, UART_IIR), 0);
  });

  it("keeps LCR and SCR as written", () => {
    const { uart } = makeUart();
    for (let v = 0; v < 256; v++) {
      wr(uart, UART_SCR, v);
      assert.equal(rd(uart, UART_SCR), v);
    }
    for (const v of [0x00, 0x03, 0x1b, 0x7f]) {
      wr(uart, UART_LCR, v);
      assert.equal(rd(uart, UART_LCR), v);
    }
  });

  it("passes the Linux 8250 autoconfig probes as a 16550A", () => {
    const { uart } = makeUart();
    // IER test: only the low nibble exists.
    wr(uart, UART_IER, 0);
    assert.equal(rd(uart, UART_IER) & 0x0f, 0);
    wr(uart, UART_IER, 0x0f);
    assert.equal(rd(uart, UART_IER) & 0x0f, 0x0f);
    wr(uart, UART_IER, 0xff);
    assert.equal(rd(uart, UART_IER), 0x0f, "no XScale UUE bit, no 16750 bits");
    wr(uart, UART_IER, 0);
    // Loopback test: MCR = LOOP | RTS | OUT2 must give CTS | DCD.
    const saveMcr = rd(uart, UART_MCR);
    wr(uart, UART_MCR, MCR_LOOP | 0x0a);
    assert.equal(rd(uart, UART_MSR) & 0xf0, 0x90);
    wr(uart, UART_MCR, saveMcr);
    // FIFO test: IIR bits 6-7 both set once FCR enables the FIFO.
    wr(uart, UART_FCR, 0x01);
    assert.equal(rd(uart, UART_IIR) >> 6, 3);
    // 16750 test: the 64-byte FIFO bit (IIR bit 5) never sets.
    wr(uart, UART_FCR, 0x21);
    assert.equal((rd(uart, UART_IIR) >> 5) & 1, 0);
    wr(uart, UART_LCR, 0x80);
    wr(uart, UART_FCR, 0x21);
    assert.equal((rd(uart, UART_IIR) >> 5) & 1, 0);
    wr(uart, UART_LCR, 0);
    // FIFO off: IIR bits 6-7 clear again.
    wr(uart, UART_FCR, 0);
    assert.equal(rd(uart, UART_IIR), 0x01);
  });

  it("loopback sends THR back to RBR and wires MCR outputs to MSR", () => {
    const { uart, rec } = makeUart();
    wr(uart, UART_MCR, MCR_LOOP);
    assert.equal(rd(uart, UART_MSR) & 0xf0, 0, "no outputs asserted, no inputs");
    const msg = [0x00, 0x55, 0xaa, 0xff, 0x0d, 0x0a];
    for (const b of msg) wr(uart, UART_THR, b);
    assert.deepEqual(rec.bytes, [], "loopback bytes do not leave the UART");
    assert.equal(rd(uart, UART_LSR) & LSR_DR, LSR_DR);
    const back: number[] = [];
    while (rd(uart, UART_LSR) & LSR_DR) back.push(rd(uart, UART_RBR));
    assert.deepEqual(back, msg);
    assert.equal(uart.txBytes, 0);

    // Each output maps to one input: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
    const map: [number, number][] = [
      [0x01, 0x20],
      [0x02, 0x10],
      [0x04, 0x40],
      [0x08, 0x80],
    ];
    for (const [out, input] of map) {
      wr(uart, UART_MCR, MCR_LOOP | out);
      assert.equal(rd(uart, UART_MSR) & 0xf0, input, `MCR 0x${out.toString(16)}`);
    }
    // Delta bits: DCTS/DDSR/DDCD on any change, TERI on RI's trailing edge only.
    wr(uart, UART_MCR, MCR_LOOP);
    rd(uart, UART_MSR); // clear
    wr(uart, UART_MCR, MCR_LOOP | 0x0f);
    assert.equal(rd(uart, UART_MSR), 0xf0 | 0x0b, "rising: DCTS, DDSR, DDCD, no TERI");
    assert.equal(rd(uart, UART_MSR), 0xf0, "reading MSR clears the deltas");
    wr(uart, UART_MCR, MCR_LOOP);
    assert.equal(rd(uart, UART_MSR), 0x0f, "falling: all four deltas incl. TERI");
    // Leaving loopback: the always-ready terminal again.
    wr(uart, UART_MCR, MCR_OUT2);
    assert.equal(rd(uart, UART_MSR) & 0xf0, 0xb0);
    wr(uart, UART_THR, 0x42);
    assert.deepEqual(rec.bytes, [0x42]);
  });

  it("reports DR, THRE and TEMT in LSR", () => {
    const { uart } = makeUart();
    assert.equal(rd(uart, UART_LSR), LSR_THRE | LSR_TEMT);
    assert.equal(uart.receive(Uint8Array.of(1, 2)), 2);
    assert.equal(rd(uart, UART_LSR), LSR_DR | LSR_THRE | LSR_TEMT);
    assert.equal(rd(uart, UART_RBR), 1);
    assert.equal(rd(uart, UART_LSR), LSR_DR | LSR_THRE | LSR_TEMT);
    assert.equal(rd(uart, UART_RBR), 2);
    assert.equal(rd(uart, UART_LSR), LSR_THRE | LSR_TEMT);
    wr(uart, UART_THR, 0x33);
    assert.equal(rd(uart, UART_LSR), LSR_THRE | LSR_TEMT, "transmission is instantaneous");
    assert.equal(rd(uart, UART_RBR), 2, "an empty RBR repeats the last byte");
  });

  it("orders IIR by priority and clears each source the datasheet way", () => {
    const { uart } = makeUart();
    wr(uart, UART_FCR, 0x01); // FIFO on, trigger 1
    // Overrun (line status): fill the FIFO, then loop one more byte into it.
    assert.equal(uart.receive(new Uint8Array(SERIAL_RX_FIFO_SIZE)), SERIAL_RX_FIFO_SIZE);
    wr(uart, UART_MCR, MCR_LOOP | MCR_OUT2); // also a modem-status change
    wr(uart, UART_THR, 0x99);
    assert.equal(uart.overruns, 1);
    wr(uart, UART_IER, IER_ERBFI | IER_ETBEI | IER_ELSI | IER_EDSSI);

    assert.equal(rd(uart, UART_IIR), 0xc6, "receiver line status first");
    assert.equal(rd(uart, UART_IIR), 0xc6, "IIR reads do not clear it");
    assert.equal(rd(uart, UART_LSR) & LSR_OE, LSR_OE);
    assert.equal(rd(uart, UART_LSR) & LSR_OE, 0, "LSR read clears OE");
    assert.equal(rd(uart, UART_IIR), 0xc4, "then received data");
    wr(uart, UART_FCR, 0x03); // clear the RX FIFO
    assert.equal(rd(uart, UART_IIR), 0xc2, "then THR empty");
    assert.equal(rd(uart, UART_IIR), 0xc0, "reading IIR acknowledged THRE; modem status next");
    rd(uart, UART_MSR);
    assert.equal(rd(uart, UART_IIR), 0xc1, "nothing left");
    assert.equal(uart.irqLevel, false);
  });

  it("does not acknowledge THRE when IIR reported something above it", () => {
    const { uart } = makeUart();
    wr(uart, UART_IER, IER_ERBFI | IER_ETBEI);
    uart.receive(Uint8Array.of(7));
    assert.equal(rd(uart, UART_IIR), 0x04);
    rd(uart, UART_RBR);
    assert.equal(rd(uart, UART_IIR), 0x02, "THRE still pending");
    assert.equal(rd(uart, UART_IIR), 0x01);
  });

  it("raises and clears THRE like serial8250_do_startup's test and start_tx expect", () => {
    const { uart, rec } = makeUart();
    // serial8250_do_startup: clear FIFOs, read LSR/RBR/IIR/MSR, LCR 8N1, MCR OUT2|DTR|RTS.
    wr(uart, UART_FCR, 0x01);
    wr(uart, UART_FCR, 0x07);
    wr(uart, UART_FCR, 0x00);
    rd(uart, UART_LSR);
    rd(uart, UART_RBR);
    rd(uart, UART_IIR);
    rd(uart, UART_MSR);
    assert.notEqual(rd(uart, UART_LSR), 0xff);
    wr(uart, UART_LCR, 0x03);
    wr(uart, UART_MCR, 0x0b);
    // THRE test: the interrupt must be re-asserted when ETBEI goes 0 -> 1 again.
    wr(uart, UART_IER, IER_ETBEI);
    const iir1 = rd(uart, UART_IIR);
    wr(uart, UART_IER, 0);
    wr(uart, UART_IER, IER_ETBEI);
    const iir2 = rd(uart, UART_IIR);
    wr(uart, UART_IER, 0);
    assert.equal(iir1 & 0x0f, 0x02);
    assert.equal(iir2 & 0x0f, 0x02, "no UART_BUG_THRE");
    assert.deepEqual(rec.levels, [true, false, true, false]);

    // set_termios: FIFO on with an 8-byte trigger; then the port is in use with RX enabled.
    wr(uart, UART_FCR, 0x81);
    wr(uart, UART_IER, IER_ERBFI);
    rec.levels.length = 0;
    // start_tx: ETBEI 0 -> 1 raises the interrupt...
    wr(uart, UART_IER, IER_ERBFI | IER_ETBEI);
    assert.deepEqual(rec.levels, [true]);
    // ...the handler reads IIR (acknowledging THRE, line drops)...
    assert.equal(rd(uart, UART_IIR), 0xc2);
    assert.deepEqual(rec.levels, [true, false]);
    // ...writes a FIFO's worth to THR: it empties at once, so THRE is due again (one rise)...
    const text = [...Buffer.from("hello, world!\r\n")];
    for (const b of text) wr(uart, UART_THR, b);
    assert.deepEqual(rec.bytes, text);
    assert.deepEqual(rec.levels, [true, false, true]);
    // ...the handler comes back, finds THRE, has nothing left to send: stop_tx clears ETBEI.
    assert.equal(rd(uart, UART_IIR), 0xc2);
    wr(uart, UART_IER, IER_ERBFI);
    assert.equal(rd(uart, UART_IIR), 0xc1);
    assert.deepEqual(rec.levels, [true, false, true, false]);
    // Disabling ETBEI forgets a pending THRE interrupt.
    wr(uart, UART_IER, IER_ERBFI | IER_ETBEI);
    wr(uart, UART_IER, IER_ERBFI);
    assert.equal(rd(uart, UART_IIR), 0xc1);
  });

  it("holds 4 KiB of host input, refuses the excess and drains in order", () => {
    const { uart } = makeUart();
    const input = new Uint8Array(SERIAL_RX_FIFO_SIZE + 100).map((_, i) => (i * 7) & 0xff);
    assert.equal(uart.receive(input), SERIAL_RX_FIFO_SIZE);
    assert.equal(uart.rxFree(), 0);
    assert.equal(uart.rxPending(), SERIAL_RX_FIFO_SIZE);
    assert.equal(uart.receive(input.subarray(SERIAL_RX_FIFO_SIZE)), 0, "full: the host keeps the rest");
    assert.equal(rd(uart, UART_LSR) & LSR_OE, 0, "refused input is not an overrun");
    // Drain half, offer the rest, drain everything: the order survives the ring wrap.
    const out: number[] = [];
    for (let i = 0; i < 3000; i++) out.push(rd(uart, UART_RBR));
    assert.equal(uart.receive(input.subarray(SERIAL_RX_FIFO_SIZE)), 100);
    while (rd(uart, UART_LSR) & LSR_DR) out.push(rd(uart, UART_RBR));
    assert.deepEqual(out, [...input]);
    assert.equal(uart.rxFree(), SERIAL_RX_FIFO_SIZE);
  });

  it("refuses host input in loopback, where the serial input is disconnected", () => {
    const { uart } = makeUart();
    wr(uart, UART_MCR, MCR_LOOP);
    assert.equal(uart.receive(Uint8Array.of(1, 2, 3)), 0);
    wr(uart, UART_MCR, 0);
    assert.equal(uart.receive(Uint8Array.of(1, 2, 3)), 3);
  });

  it("overruns only when a byte is really lost, and LSR reports it once", () => {
    const { uart } = makeUart();
    wr(uart, UART_MCR, MCR_LOOP);
    for (let i = 0; i < SERIAL_RX_FIFO_SIZE; i++) wr(uart, UART_THR, i & 0xff);
    assert.equal(uart.overruns, 0);
    assert.equal(rd(uart, UART_LSR) & LSR_OE, 0);
    wr(uart, UART_THR, 0xee);
    wr(uart, UART_THR, 0xef);
    assert.equal(uart.overruns, 2);
    assert.equal(rd(uart, UART_LSR), LSR_DR | LSR_OE | LSR_THRE | LSR_TEMT);
    assert.equal(rd(uart, UART_LSR), LSR_DR | LSR_THRE | LSR_TEMT);
    // The FIFO kept the first 4096 bytes, not the lost ones.
    for (let i = 0; i < SERIAL_RX_FIFO_SIZE; i++) assert.equal(rd(uart, UART_RBR), i & 0xff);
    assert.equal(rd(uart, UART_LSR) & LSR_DR, 0);
  });

  it("clears the RX FIFO on FCR bit 1 and when the FIFO is switched on or off", () => {
    const { uart } = makeUart();
    uart.receive(Uint8Array.of(1, 2, 3));
    wr(uart, UART_FCR, 0x01); // enabling the FIFO empties it
    assert.equal(uart.rxPending(), 0);
    uart.receive(Uint8Array.of(1, 2, 3));
    wr(uart, UART_FCR, 0x01); // no change, no clear
    assert.equal(uart.rxPending(), 3);
    wr(uart, UART_FCR, 0x03);
    assert.equal(uart.rxPending(), 0);
    assert.equal(rd(uart, UART_LSR) & LSR_DR, 0);
    uart.receive(Uint8Array.of(4));
    wr(uart, UART_FCR, 0x04); // disabling (and clearing TX) empties the RX side too
    assert.equal(uart.rxPending(), 0);
  });

  it("reports data under the trigger level as a character timeout", () => {
    const { uart } = makeUart();
    wr(uart, UART_IER, IER_ERBFI);
    uart.receive(Uint8Array.of(1, 2, 3));
    assert.equal(rd(uart, UART_IIR), 0x04, "FIFO off: plain received-data");
    wr(uart, UART_FCR, 0xc1); // trigger level 14 (and the FIFO switch empties it)
    uart.receive(new Uint8Array(13));
    assert.equal(rd(uart, UART_IIR), 0xcc);
    uart.receive(Uint8Array.of(0));
    assert.equal(rd(uart, UART_IIR), 0xc4);
    rd(uart, UART_RBR);
    assert.equal(rd(uart, UART_IIR), 0xcc);
    wr(uart, UART_FCR, 0x41); // trigger 4
    uart.receive(new Uint8Array(4));
    assert.equal(rd(uart, UART_IIR), 0xc4);
  });

  it("drives the IRQ line only on changes of level", () => {
    const { uart, rec } = makeUart();
    uart.receive(Uint8Array.of(1));
    assert.deepEqual(rec.levels, [], "RX interrupt not enabled");
    wr(uart, UART_IER, IER_ERBFI);
    uart.receive(Uint8Array.of(2));
    uart.receive(Uint8Array.of(3));
    rd(uart, UART_IIR);
    rd(uart, UART_LSR);
    assert.deepEqual(rec.levels, [true]);
    rd(uart, UART_RBR);
    rd(uart, UART_RBR);
    assert.deepEqual(rec.levels, [true]);
    rd(uart, UART_RBR);
    assert.deepEqual(rec.levels, [true, false]);
    // RX then THRE pending: the line stays up across the hand-over.
    wr(uart, UART_IER, IER_ERBFI | IER_ETBEI);
    uart.receive(Uint8Array.of(4));
    rd(uart, UART_RBR);
    assert.deepEqual(rec.levels, [true, false, true]);
    rd(uart, UART_IIR);
    assert.deepEqual(rec.levels, [true, false, true, false]);
    wr(uart, UART_IER, 0);
    assert.deepEqual(rec.levels, [true, false, true, false]);
  });

  it("shares all state between objects over the same buffer", () => {
    const state = Serial.createState();
    const a = new Recorder();
    const b = new Recorder();
    const ua = new Serial(state, a.sink, a.irq);
    const ub = new Serial(state.buffer, b.sink, b.irq); // what a worker gets
    const uc = new Serial({ buffer: state.buffer }, b.sink, b.irq); // a posted SharedState
    wr(ua, UART_LCR, 0x83);
    wr(ua, UART_DLL, 0x01);
    assert.equal(rd(ub, UART_DLL), 0x01);
    wr(ub, UART_LCR, 0x03);
    wr(ub, UART_IER, IER_ERBFI);
    assert.equal(ua.receive(Uint8Array.of(9)), 1);
    assert.deepEqual(a.levels, [true]);
    assert.deepEqual(b.levels, []);
    assert.equal(rd(uc, UART_RBR), 9);
    assert.deepEqual(b.levels, [false], "the thread that lowers the level drives the line");
    assert.equal(ua.irqLevel, false);
    assert.throws(() => new Serial(new SharedArrayBuffer(16), a.sink, a.irq), RangeError);
  });

  it("splits a wide access into byte cycles", () => {
    const { uart } = makeUart();
    wr(uart, UART_SCR, 0x5a);
    const d = new Uint8Array(2);
    uart.read(UART_MSR, d);
    assert.deepEqual([...d], [0xb0, 0x5a]);
    uart.read(UART_SCR, d);
    assert.deepEqual([...d], [0x5a, 0xff]);
  });
});

// ---- Threads ----

const WORKER_SOURCE = `
const { workerData } = require("node:worker_threads");
const { Serial } = require(workerData.modulePath);
const { state, log, irqLog, control, tid, count, firstByte } = workerData;
const logCells = new Int32Array(log);
const irqCells = new Int32Array(irqLog);
const ctl = new Int32Array(control);
// The sink runs in the writing thread; it appends (thread << 8 | byte) to a shared log.
const sink = { write(bytes) {
  for (const b of bytes) Atomics.store(logCells, 1 + Atomics.add(logCells, 0, 1), (tid << 8) | b);
} };
const irq = { set(level) { Atomics.store(irqCells, 1 + Atomics.add(irqCells, 0, 1), level ? 1 : 0); } };
const uart = new Serial(state, sink, irq);
Atomics.add(ctl, 1, 1);
Atomics.notify(ctl, 1);
while (Atomics.load(ctl, 0) === 0) Atomics.wait(ctl, 0, 0, 100);
const d = new Uint8Array(1);
for (let k = 0; k < count; k++) {
  d[0] = firstByte + (k % 128);
  uart.write(0, d);
}
Atomics.add(ctl, 2, 1);
`;

interface SharedRun {
  state: SharedArrayBuffer;
  log: Int32Array;
  irqLog: Int32Array;
  control: Int32Array;
  workers: Worker[];
}

function startWriters(state: SharedArrayBuffer, count: number): SharedRun {
  const log = new Int32Array(new SharedArrayBuffer(4 * (1 + 2 * count)));
  const irqLog = new Int32Array(new SharedArrayBuffer(4 * (1 + 8 * count)));
  const control = new Int32Array(new SharedArrayBuffer(16)); // go, ready, done
  const modulePath = require.resolve("../../src/devices/legacy/serial");
  const workers = [1, 2].map(
    (tid) =>
      new Worker(WORKER_SOURCE, {
        eval: true,
        workerData: {
          modulePath,
          state,
          log: log.buffer,
          irqLog: irqLog.buffer,
          control: control.buffer,
          tid,
          count,
          firstByte: tid === 1 ? 0x00 : 0x80,
        },
      }),
  );
  for (const w of workers) w.on("error", (e) => assert.fail(e));
  return { state, log, irqLog, control, workers };
}

async function untilReady(run: SharedRun): Promise<void> {
  const deadline = Date.now() + 20_000;
  while (Atomics.load(run.control, 1) < run.workers.length) {
    assert.ok(Date.now() < deadline, "workers did not start");
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Check one origin's bytes arrived exactly once each, in the order it wrote them. */
function checkSequence(bytes: number[], firstByte: number, count: number, what: string): void {
  assert.equal(bytes.length, count, `${what}: ${bytes.length} bytes, expected ${count}`);
  for (let k = 0; k < count; k++) {
    if (bytes[k] !== firstByte + (k % 128)) assert.fail(`${what}: byte ${k} is ${bytes[k]}`);
  }
}

describe("16550A UART shared between threads", () => {
  it("passes every THR byte from two vCPU threads to the sink exactly once", async () => {
    const COUNT = 20_000;
    const state = Serial.createState();
    const run = startWriters(state.buffer, COUNT);
    // The main thread has its own object over the same state, logging its IRQ calls into the
    // same log, and keeps acknowledging THRE while the workers write.
    const mainIrq: IrqLine = {
      set: (level) => Atomics.store(run.irqLog, 1 + Atomics.add(run.irqLog, 0, 1), level ? 1 : 0),
    };
    const uart = new Serial(state, { write: () => assert.fail("main thread never writes THR") }, mainIrq);
    wr(uart, UART_IER, IER_ETBEI);
    await untilReady(run);
    Atomics.store(run.control, 0, 1);
    Atomics.notify(run.control, 0);
    let seen = 0;
    const deadline = Date.now() + 60_000;
    while (Atomics.load(run.control, 2) < 2) {
      assert.ok(Date.now() < deadline, "writers did not finish");
      rd(uart, UART_IIR); // acknowledges THRE, so the level keeps toggling
      rd(uart, UART_LSR);
      const n = Atomics.load(run.log, 0);
      assert.ok(n >= seen, "the sink log only grows");
      seen = n;
      if ((seen & 0x3ff) === 0) await new Promise((r) => setImmediate(r));
    }
    await Promise.all(run.workers.map((w) => new Promise((r) => w.once("exit", r))));

    const total = Atomics.load(run.log, 0);
    assert.equal(total, 2 * COUNT);
    assert.equal(uart.txBytes, 2 * COUNT, "the shared TX counter lost no update");
    const byThread: number[][] = [[], [], []];
    for (let i = 0; i < total; i++) {
      const e = run.log[1 + i]!;
      byThread[e >> 8]!.push(e & 0xff);
    }
    checkSequence(byThread[1]!, 0x00, COUNT, "thread 1");
    checkSequence(byThread[2]!, 0x80, COUNT, "thread 2");

    // Every thread's IRQ calls, in lock order: strictly alternating levels, starting high.
    const calls = Atomics.load(run.irqLog, 0);
    assert.ok(calls >= 1);
    for (let i = 0; i < calls; i++) assert.equal(run.irqLog[1 + i], i % 2 === 0 ? 1 : 0, `irq call ${i}`);
    assert.equal(uart.irqLevel, calls % 2 === 1);
  });

  it("loses and duplicates nothing when vCPUs loop bytes into the FIFO the main thread drains", async () => {
    // Both writers together fit the 4 KiB FIFO, so no interleaving may overrun it.
    const COUNT = SERIAL_RX_FIFO_SIZE / 2;
    const state = Serial.createState();
    const uart = new Serial(state, { write: () => assert.fail("loopback") }, { set: () => {} });
    wr(uart, UART_MCR, MCR_LOOP);
    const run = startWriters(state.buffer, COUNT);
    await untilReady(run);
    Atomics.store(run.control, 0, 1);
    Atomics.notify(run.control, 0);
    const got: number[] = [];
    const deadline = Date.now() + 60_000;
    for (;;) {
      assert.ok(Date.now() < deadline, "writers did not finish");
      const done = Atomics.load(run.control, 2) === 2;
      while (rd(uart, UART_LSR) & LSR_DR) got.push(rd(uart, UART_RBR));
      if (done) break;
    }
    await Promise.all(run.workers.map((w) => new Promise((r) => w.once("exit", r))));
    assert.equal(uart.overruns, 0);
    assert.equal(got.length, 2 * COUNT);
    checkSequence(
      got.filter((b) => b < 0x80),
      0x00,
      COUNT,
      "thread 1",
    );
    checkSequence(
      got.filter((b) => b >= 0x80),
      0x80,
      COUNT,
      "thread 2",
    );
  });
});

describe("16550A THR writes coalesced by KVM", () => {
  it("asks for coalescing exactly while a THR write shows the guest nothing: DLAB off, no TX interrupt, no loopback", () => {
    const calls: boolean[] = [];
    const state = Serial.createState();
    const rec = new Recorder();
    const uart = new Serial(state, rec.sink, rec.irq, { set: (on) => void calls.push(on) });
    wr(uart, UART_THR, 0x41); // the first write finds the reset state eligible
    assert.deepEqual(calls, [true]);
    wr(uart, UART_THR, 0x42);
    assert.deepEqual(calls, [true], "only changes are passed on");
    wr(uart, UART_LCR, 0x83); // DLAB: offset 0 is the divisor latch now
    assert.deepEqual(calls, [true, false]);
    wr(uart, UART_LCR, 0x03);
    assert.deepEqual(calls, [true, false, true]);
    wr(uart, UART_IER, 0x02); // THRE interrupt on: each write must raise it at once
    assert.deepEqual(calls, [true, false, true, false]);
    wr(uart, UART_IER, 0x00);
    wr(uart, UART_MCR, 0x18); // loopback: THR goes to RBR
    wr(uart, UART_MCR, 0x08);
    assert.deepEqual(calls, [true, false, true, false, true, false, true]);
    assert.deepEqual(rec.bytes, [0x41, 0x42]);
  });

  it("a host that refuses leaves every write exiting, and the UART working", () => {
    const state = Serial.createState();
    const rec = new Recorder();
    let tries = 0;
    const uart = new Serial(state, rec.sink, rec.irq, {
      set: () => {
        tries++;
        throw new Error("ioctl KVM_REGISTER_COALESCED_MMIO failed: EINVAL");
      },
    });
    wr(uart, UART_THR, 0x61);
    wr(uart, UART_THR, 0x62);
    assert.ok(tries >= 1);
    assert.deepEqual(rec.bytes, [0x61, 0x62]);
  });
});
