/**
 * A 16550A UART, the guest's serial console (COM1: ports 0x3f8..0x3ff, IRQ 4; where it sits
 * is the machine's business, the device only sees offsets 0..7).
 *
 * The model follows the datasheet as the Linux 8250 driver exercises it (autoconfig, the
 * THRE test in serial8250_do_startup, serial8250_start_tx and the interrupt handler):
 *
 * - Transmission is instantaneous: a byte written to THR goes to the ByteSink at once (or,
 *   in loopback, into the RX FIFO), so LSR.THRE and LSR.TEMT always read 1.
 * - The RX FIFO is 4 KiB, not 16 bytes, so host input typed or pasted faster than the guest
 *   drains it is held rather than lost; `receive()` takes what fits and the host retries the
 *   rest later. Overrun (LSR.OE) is only raised when a byte is really dropped: a loopback
 *   byte arriving at a full FIFO.
 * - FIFO character timeouts are simplified: with the FIFO enabled, data below the trigger
 *   level is reported at once as a timeout interrupt (IIR 0xCC); at or above it, as
 *   "received data available" (0xC4). Linux treats both alike.
 * - The IRQ is a level: asserted while IIR reports an interrupt, and `IrqLine.set` is called
 *   only when that level changes (the last level lives in shared state so every thread
 *   agrees). On the PC's edge-triggered line this is QEMU's behaviour: each rise is one
 *   interrupt, and Linux's handler reads IIR until it says "none", which lowers the line.
 *   MCR.OUT2, which gates the IRQ onto the ISA bus on a real PC board, is not modelled as a
 *   gate (QEMU does not either): Linux sets it before enabling any interrupt anyway.
 *
 * Threads: every register access, and `receive()`, runs under the SharedState lock. The sink
 * and the IRQ line are called inside the lock too, so bytes written to THR by several vCPUs
 * reach the sink exactly once each and in THR order, and IRQ level changes reach the irqchip
 * in the order they happened. Neither handle may call back into this device (the lock is not
 * re-entrant).
 */
import { type BusDevice, type ByteSink, type IrqLine, type WriteCoalescing } from "../device";
import { SharedState } from "../shared-state";
import { adoptState, type StateLike } from "./state-like";

export const COM1_BASE = 0x3f8;
export const COM1_IRQ = 4;
/** The UART decodes eight ports. */
export const SERIAL_PORT_COUNT = 8;
/** Bytes of host input the device holds before `receive()` starts refusing. */
export const SERIAL_RX_FIFO_SIZE = 4096;

// Register offsets (DLAB = LCR bit 7 turns 0 and 1 into the divisor latch).
export const UART_RBR = 0; // read: receiver buffer
export const UART_THR = 0; // write: transmitter holding
export const UART_DLL = 0; // DLAB=1
export const UART_IER = 1;
export const UART_DLM = 1; // DLAB=1
export const UART_IIR = 2; // read
export const UART_FCR = 2; // write
export const UART_LCR = 3;
export const UART_MCR = 4;
export const UART_LSR = 5;
export const UART_MSR = 6;
export const UART_SCR = 7;

// IER bits.
export const IER_ERBFI = 0x01; // received data available
export const IER_ETBEI = 0x02; // THR empty
export const IER_ELSI = 0x04; // receiver line status
export const IER_EDSSI = 0x08; // modem status

// IIR values (low nibble) and the FIFO-enabled bits.
export const IIR_NO_INT = 0x01;
export const IIR_MSI = 0x00;
export const IIR_THRI = 0x02;
export const IIR_RDI = 0x04;
export const IIR_RLSI = 0x06;
export const IIR_CTI = 0x0c;
export const IIR_FIFO_ENABLED = 0xc0;

// FCR bits.
export const FCR_ENABLE = 0x01;
export const FCR_CLEAR_RX = 0x02;
export const FCR_CLEAR_TX = 0x04;
const FCR_TRIGGER_MASK = 0xc0;

export const LCR_DLAB = 0x80;

// MCR bits.
export const MCR_DTR = 0x01;
export const MCR_RTS = 0x02;
export const MCR_OUT1 = 0x04;
export const MCR_OUT2 = 0x08;
export const MCR_LOOP = 0x10;

// LSR bits.
export const LSR_DR = 0x01;
export const LSR_OE = 0x02;
export const LSR_PE = 0x04;
export const LSR_FE = 0x08;
export const LSR_BI = 0x10;
export const LSR_THRE = 0x20;
export const LSR_TEMT = 0x40;
const LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI;

// MSR bits.
export const MSR_DCTS = 0x01;
export const MSR_DDSR = 0x02;
export const MSR_TERI = 0x04;
export const MSR_DDCD = 0x08;
export const MSR_CTS = 0x10;
export const MSR_DSR = 0x20;
export const MSR_RI = 0x40;
export const MSR_DCD = 0x80;

// Cells of the shared state. Everything mutable lives here, nothing in the object.
const C_IER = 0;
const C_LCR = 1;
const C_MCR = 2;
const C_SCR = 3;
const C_DLL = 4;
const C_DLM = 5;
/** FCR as it matters after the write: enable bit and trigger level (0 when disabled). */
const C_FCR = 6;
/** The sticky error bits of LSR (OE, PE, FE, BI); DR and THRE/TEMT are computed. */
const C_LSR_ERRORS = 7;
/** The delta bits of MSR, cleared by reading MSR. */
const C_MSR_DELTA = 8;
/** THR-empty interrupt pending (the QEMU "thr_ipending" latch). */
const C_THR_PENDING = 9;
/** The level last driven on the IRQ line (0/1). */
const C_IRQ_LEVEL = 10;
const C_RX_HEAD = 11;
const C_RX_COUNT = 12;
/** What RBR holds when the FIFO is empty: the last byte read. */
const C_RBR_LAST = 13;
/** Statistics: bytes sent to the sink, bytes lost to overrun. */
const C_TX_BYTES = 14;
const C_OVERRUNS = 15;
/** THR writes are coalesced by KVM right now (WriteCoalescing on), 0/1. */
const C_COALESCED = 16;
const CELLS = 17;

/** Receive-FIFO trigger levels selected by FCR bits 6-7. */
const TRIGGER_LEVELS = [1, 4, 8, 14] as const;

export class Serial implements BusDevice {
  static readonly CELLS = CELLS;
  static readonly EXTRA_BYTES = SERIAL_RX_FIFO_SIZE;

  /** Fresh register state, as after a hardware reset. Post `state.buffer` to workers. */
  static createState(): SharedState {
    const state = SharedState.create(CELLS, SERIAL_RX_FIFO_SIZE);
    // Divisor 12 = 9600 baud from the 1.8432 MHz clock; Linux reprograms it anyway.
    state.set(C_DLL, 12);
    // OUT2 gates the IRQ onto the ISA bus on a PC; firmware leaves it set.
    state.set(C_MCR, MCR_OUT2);
    return state;
  }

  private readonly s: SharedState;
  private readonly fifo: Uint8Array;

  private readonly txByte = new Uint8Array(1);

  constructor(
    state: StateLike,
    private readonly sink: ByteSink,
    private readonly irq: IrqLine,
    /**
     * THR writes as KVM coalesced writes while they can be (DLAB off, no transmit interrupt,
     * no loopback): the kernel's console then costs one exit per character (the LSR read)
     * instead of two.
     */
    private readonly coalescing?: WriteCoalescing,
  ) {
    this.s = adoptState(state, CELLS, SERIAL_RX_FIFO_SIZE, "serial");
    this.fifo = this.s.bytes();
  }

  // ---- BusDevice ----

  read(offset: number, data: Uint8Array): void {
    // A wide access is split into byte cycles, as the ISA bus does.
    for (let i = 0; i < data.length; i++) {
      const reg = offset + i;
      data[i] = reg < SERIAL_PORT_COUNT ? this.readRegister(reg) : 0xff;
    }
  }

  write(offset: number, data: Uint8Array): void {
    for (let i = 0; i < data.length; i++) {
      const reg = offset + i;
      if (reg < SERIAL_PORT_COUNT) this.writeRegister(reg, data[i]!);
    }
  }

  // ---- Host side ----

  /**
   * Host input for the guest. Takes as many bytes as the RX FIFO has room for and returns
   * that count; the caller keeps the rest and offers it again later (see `rxFree()`). Takes
   * nothing while the UART is in loopback, when its serial input is disconnected.
   */
  receive(bytes: Uint8Array): number {
    const s = this.s;
    s.lock();
    try {
      if ((s.get(C_MCR) & MCR_LOOP) !== 0) return 0;
      const count = s.get(C_RX_COUNT);
      const n = Math.min(bytes.length, SERIAL_RX_FIFO_SIZE - count);
      if (n === 0) return 0;
      let tail = (s.get(C_RX_HEAD) + count) % SERIAL_RX_FIFO_SIZE;
      for (let i = 0; i < n; i++) {
        this.fifo[tail] = bytes[i]!;
        tail = tail + 1 === SERIAL_RX_FIFO_SIZE ? 0 : tail + 1;
      }
      s.set(C_RX_COUNT, count + n);
      this.updateIrq();
      return n;
    } finally {
      s.unlock();
    }
  }

  /** Room left in the RX FIFO, for a host deciding when to offer more input. */
  rxFree(): number {
    return SERIAL_RX_FIFO_SIZE - this.s.get(C_RX_COUNT);
  }

  /** Bytes waiting in the RX FIFO. */
  rxPending(): number {
    return this.s.get(C_RX_COUNT);
  }

  /** Bytes the guest has transmitted to the sink so far. */
  get txBytes(): number {
    return this.s.get(C_TX_BYTES) >>> 0;
  }

  /** Bytes lost to receiver overrun (only loopback traffic can overrun). */
  get overruns(): number {
    return this.s.get(C_OVERRUNS) >>> 0;
  }

  /** The level this device is driving on its IRQ line. */
  get irqLevel(): boolean {
    return this.s.get(C_IRQ_LEVEL) !== 0;
  }

  // ---- Registers ----

  readRegister(reg: number): number {
    const s = this.s;
    s.lock();
    try {
      const value = this.readLocked(reg & 7);
      this.updateIrq();
      return value;
    } finally {
      s.unlock();
    }
  }

  writeRegister(reg: number, value: number): void {
    const s = this.s;
    s.lock();
    try {
      this.writeLocked(reg & 7, value & 0xff);
      this.updateIrq();
      if (this.coalescing !== undefined) this.updateCoalescing(this.coalescing);
    } finally {
      s.unlock();
    }
  }

  private readLocked(reg: number): number {
    const s = this.s;
    const dlab = (s.get(C_LCR) & LCR_DLAB) !== 0;
    switch (reg) {
      case UART_RBR:
        return dlab ? s.get(C_DLL) : this.popRx();
      case UART_IER:
        return dlab ? s.get(C_DLM) : s.get(C_IER);
      case UART_IIR: {
        // IIR reads the same whatever DLAB says (Linux's EFR probes rely on that).
        const iir = this.computeIir();
        // Reading IIR while it reports THRE is what acknowledges that interrupt.
        if ((iir & 0x0f) === IIR_THRI) s.set(C_THR_PENDING, 0);
        return iir;
      }
      case UART_LCR:
        return s.get(C_LCR);
      case UART_MCR:
        return s.get(C_MCR);
      case UART_LSR: {
        const value = this.computeLsr();
        // The error bits report each error once.
        s.set(C_LSR_ERRORS, 0);
        return value;
      }
      case UART_MSR: {
        const value = this.msrLines() | s.get(C_MSR_DELTA);
        s.set(C_MSR_DELTA, 0);
        return value;
      }
      default:
        return s.get(C_SCR);
    }
  }

  private writeLocked(reg: number, value: number): void {
    const s = this.s;
    const dlab = (s.get(C_LCR) & LCR_DLAB) !== 0;
    switch (reg) {
      case UART_THR:
        if (dlab) s.set(C_DLL, value);
        else this.transmit(value);
        return;
      case UART_IER:
        if (dlab) s.set(C_DLM, value);
        else this.writeIer(value & 0x0f); // bits 4-7 are reserved and read 0 on a 16550A
        return;
      case UART_FCR:
        this.writeFcr(value);
        return;
      case UART_LCR:
        s.set(C_LCR, value);
        return;
      case UART_MCR:
        this.writeMcr(value & 0x1f);
        return;
      case UART_LSR:
      case UART_MSR:
        // Factory-test writes; a guest has no business here, so they are dropped.
        return;
      default:
        s.set(C_SCR, value);
    }
  }

  /** Coalesce THR writes exactly while a THR write shows the guest nothing but LSR (always empty). */
  private updateCoalescing(c: WriteCoalescing): void {
    const s = this.s;
    const want = (s.get(C_LCR) & LCR_DLAB) === 0 && (s.get(C_IER) & IER_ETBEI) === 0 && (s.get(C_MCR) & MCR_LOOP) === 0;
    if (want === (s.get(C_COALESCED) !== 0)) return;
    try {
      c.set(want);
      s.set(C_COALESCED, want ? 1 : 0);
    } catch {
      // The host cannot: every write keeps exiting, which is only slower.
    }
  }

  private transmit(byte: number): void {
    const s = this.s;
    // The byte moves from THR to the shift register and out at once, so THR is empty again
    // by the time the write returns: the THRE interrupt, acknowledged by this write, is due
    // again straight away if it is enabled.
    s.set(C_THR_PENDING, (s.get(C_IER) & IER_ETBEI) !== 0 ? 1 : 0);
    if ((s.get(C_MCR) & MCR_LOOP) !== 0) {
      this.pushRxOrOverrun(byte);
      return;
    }
    s.set(C_TX_BYTES, (s.get(C_TX_BYTES) + 1) | 0);
    this.txByte[0] = byte;
    this.sink.write(this.txByte);
  }

  private writeIer(value: number): void {
    const s = this.s;
    const old = s.get(C_IER);
    s.set(C_IER, value);
    if (((old ^ value) & IER_ETBEI) !== 0) {
      // Enabling ETBEI with THR empty (always, here) raises the interrupt even if an IIR read
      // had acknowledged it: Linux's THRE test and serial8250_start_tx count on this.
      // Disabling it forgets the pending interrupt.
      s.set(C_THR_PENDING, (value & IER_ETBEI) !== 0 ? 1 : 0);
    }
  }

  private writeFcr(value: number): void {
    const s = this.s;
    const wasEnabled = (s.get(C_FCR) & FCR_ENABLE) !== 0;
    const enable = (value & FCR_ENABLE) !== 0;
    // Switching the FIFOs on or off empties them; bit 1 empties the receive side on demand.
    // (Bit 2 would empty the transmit FIFO, which is always empty here.)
    if (wasEnabled !== enable || (value & FCR_CLEAR_RX) !== 0) this.clearRx();
    s.set(C_FCR, enable ? value & (FCR_ENABLE | FCR_TRIGGER_MASK) : 0);
  }

  private writeMcr(value: number): void {
    const s = this.s;
    const before = this.msrLines();
    s.set(C_MCR, value);
    const after = this.msrLines();
    const changed = before ^ after;
    let delta = 0;
    if (changed & MSR_CTS) delta |= MSR_DCTS;
    if (changed & MSR_DSR) delta |= MSR_DDSR;
    if (changed & MSR_DCD) delta |= MSR_DDCD;
    // TERI flags the trailing edge of RI only.
    if (before & MSR_RI && !(after & MSR_RI)) delta |= MSR_TERI;
    if (delta !== 0) s.set(C_MSR_DELTA, s.get(C_MSR_DELTA) | delta);
  }

  /**
   * The modem input lines (MSR bits 4-7). In loopback they are wired to MCR's outputs
   * (RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD), which is how Linux's autoconfig recognises a
   * UART; otherwise an always-ready terminal: CTS, DSR and DCD asserted, no ring.
   */
  private msrLines(): number {
    const mcr = this.s.get(C_MCR);
    if ((mcr & MCR_LOOP) === 0) return MSR_CTS | MSR_DSR | MSR_DCD;
    let lines = 0;
    if (mcr & MCR_RTS) lines |= MSR_CTS;
    if (mcr & MCR_DTR) lines |= MSR_DSR;
    if (mcr & MCR_OUT1) lines |= MSR_RI;
    if (mcr & MCR_OUT2) lines |= MSR_DCD;
    return lines;
  }

  private computeLsr(): number {
    const s = this.s;
    let lsr = LSR_THRE | LSR_TEMT | s.get(C_LSR_ERRORS);
    if (s.get(C_RX_COUNT) > 0) lsr |= LSR_DR;
    return lsr;
  }

  /** IIR by the datasheet's priorities: line status, received data, THR empty, modem status. */
  private computeIir(): number {
    const s = this.s;
    const ier = s.get(C_IER);
    const fcr = s.get(C_FCR);
    const fifoOn = (fcr & FCR_ENABLE) !== 0;
    const count = s.get(C_RX_COUNT);
    let id = IIR_NO_INT;
    if (ier & IER_ELSI && s.get(C_LSR_ERRORS) & LSR_ERRORS) {
      id = IIR_RLSI;
    } else if (ier & IER_ERBFI && count > 0) {
      id = fifoOn && count < TRIGGER_LEVELS[(fcr >> 6) & 3]! ? IIR_CTI : IIR_RDI;
    } else if (ier & IER_ETBEI && s.get(C_THR_PENDING) !== 0) {
      id = IIR_THRI;
    } else if (ier & IER_EDSSI && s.get(C_MSR_DELTA) !== 0) {
      id = IIR_MSI;
    }
    return (fifoOn ? IIR_FIFO_ENABLED : 0) | id;
  }

  /** Drive the IRQ line to match IIR, calling the line only on a change of level. */
  private updateIrq(): void {
    const s = this.s;
    const level = (this.computeIir() & IIR_NO_INT) === 0;
    if (level !== (s.get(C_IRQ_LEVEL) !== 0)) {
      s.set(C_IRQ_LEVEL, level ? 1 : 0);
      this.irq.set(level);
    }
  }

  private popRx(): number {
    const s = this.s;
    const count = s.get(C_RX_COUNT);
    if (count === 0) return s.get(C_RBR_LAST);
    const head = s.get(C_RX_HEAD);
    const byte = this.fifo[head]!;
    s.set(C_RX_HEAD, head + 1 === SERIAL_RX_FIFO_SIZE ? 0 : head + 1);
    s.set(C_RX_COUNT, count - 1);
    s.set(C_RBR_LAST, byte);
    return byte;
  }

  private pushRxOrOverrun(byte: number): void {
    const s = this.s;
    const count = s.get(C_RX_COUNT);
    if (count === SERIAL_RX_FIFO_SIZE) {
      s.set(C_LSR_ERRORS, s.get(C_LSR_ERRORS) | LSR_OE);
      s.set(C_OVERRUNS, (s.get(C_OVERRUNS) + 1) | 0);
      return;
    }
    this.fifo[(s.get(C_RX_HEAD) + count) % SERIAL_RX_FIFO_SIZE] = byte;
    s.set(C_RX_COUNT, count + 1);
  }

  private clearRx(): void {
    this.s.set(C_RX_HEAD, 0);
    this.s.set(C_RX_COUNT, 0);
  }
}
