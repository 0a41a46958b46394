/**
 * COM1's output, buffered so that the guest's console costs about one write(2) per line
 * instead of one per character (a polled kernel console writes THR once per character, and
 * each write(2) also wakes the reader).
 *
 * - ConsoleBuffer: a buffer in a SharedArrayBuffer that every thread running COM1 appends
 *   to (each through its own ConsoleBuffer over the same memory), under a lock, so output
 *   keeps the order of the appends across vCPUs. The appending thread writes everything
 *   buffered out itself when the bytes hold a newline or the buffer is full.
 * - ConsoleFlusher (main thread): a partial line (a shell prompt, "ok" and a halt) would
 *   otherwise wait while its vCPU sits in KVM_RUN. When an append leaves bytes behind in an
 *   empty buffer, it wakes the flusher (Atomics.notify), which writes them out
 *   CONSOLE_FLUSH_DELAY_MS later, without ever waiting for the fd or the lock: the main
 *   thread may be the fd's reader (the `run` mux pipe). At the end it writes what is left.
 */
import type { ByteSink } from "../devices/device";
import { SharedState, waitAsync } from "../devices/shared-state";
import * as sys from "../sys/libc";

/** Bytes held before the appending thread writes them out: one atomic pipe write. */
export const CONSOLE_BUFFER_BYTES = sys.PIPE_BUF;

/**
 * How long a partial line waits for the rest before the main thread writes it: long enough
 * that a line printed character by character is one wake-up, short enough to go unnoticed
 * when typing (the guest's echo).
 */
export const CONSOLE_FLUSH_DELAY_MS = 8;

// Cells (SharedState: cell indices; the lock is its own).
const C_LENGTH = 0;
/** Bumped when an append leaves bytes in an empty buffer; the flusher waits on it. */
const C_WAKE = 1;
const CELLS = 2;

const NEWLINE = 0x0a;

/** Where the buffer's bytes go. */
export interface ConsoleWriter {
  /** Write all of `bytes`, waiting for room; false when it gave up (the VM is stopping) and dropped the rest. */
  writeAll(bytes: Uint8Array): boolean;
  /** Write what can be written now without waiting (at most PIPE_BUF bytes); the count, 0 for none. */
  writeIfRoom(bytes: Uint8Array): number;
}

/** A writer to a file descriptor; `stopping` as for sys.writeAll's giveUp. */
export function fdWriter(fd: number, stopping?: () => boolean): ConsoleWriter {
  return { writeAll: (b) => sys.writeAll(fd, b, stopping), writeIfRoom: (b) => sys.writeIfRoom(fd, b) };
}

export class ConsoleBuffer implements ByteSink {
  /** A fresh, empty buffer's memory; post it to every thread that runs COM1. */
  static create(): SharedArrayBuffer {
    return SharedState.create(CELLS, CONSOLE_BUFFER_BYTES).buffer;
  }

  private readonly s: SharedState;
  private readonly data: Uint8Array;
  /** Bytes each guest byte takes in the buffer: 2 when tagged ([tag, byte], see SerialSinkSpec). */
  private readonly width: number;

  constructor(
    buffer: SharedArrayBuffer,
    private readonly writer: ConsoleWriter,
    private readonly tag?: number,
  ) {
    if (tag !== undefined && (!Number.isInteger(tag) || tag < 0 || tag > 255)) throw new RangeError(`a sink tag is one byte, not ${tag}`);
    this.s = new SharedState(buffer, CELLS);
    this.data = this.s.bytes();
    if (this.data.byteLength !== CONSOLE_BUFFER_BYTES) throw new RangeError(`a console buffer holds ${CONSOLE_BUFFER_BYTES} bytes, not ${this.data.byteLength}`);
    this.width = tag === undefined ? 1 : 2;
  }

  /** Bytes waiting to be written. */
  get pending(): number {
    return this.s.get(C_LENGTH);
  }

  /**
   * Append the guest's bytes (any thread). Writes everything buffered at a newline or when
   * the buffer is full, waiting for the fd as a direct write would; otherwise, if these
   * bytes are the first in the buffer, wakes the flusher.
   */
  write(bytes: Uint8Array): void {
    const s = this.s;
    s.lock();
    try {
      let length = s.get(C_LENGTH);
      let startedEmpty = length === 0;
      let newline = false;
      for (let i = 0; i < bytes.byteLength; i++) {
        if (length + this.width > CONSOLE_BUFFER_BYTES) {
          length = this.writeOutLocked(length);
          startedEmpty = true;
        }
        const b = bytes[i]!;
        if (this.tag !== undefined) this.data[length++] = this.tag;
        this.data[length++] = b;
        if (b === NEWLINE) newline = true;
      }
      if (newline || length + this.width > CONSOLE_BUFFER_BYTES) length = this.writeOutLocked(length);
      s.set(C_LENGTH, length);
      if (startedEmpty && length > 0) {
        Atomics.add(s.cells, C_WAKE + 1, 1);
        Atomics.notify(s.cells, C_WAKE + 1);
      }
    } finally {
      s.unlock();
    }
  }

  /** Write out all `length` buffered bytes, waiting for the fd; returns the new length, 0. */
  private writeOutLocked(length: number): number {
    // Emptied whatever happens: what a writer gave up on, or could not write at all, is
    // dropped as a direct write would have dropped it.
    this.s.set(C_LENGTH, 0);
    if (length > 0) this.writer.writeAll(this.data.subarray(0, length));
    return 0;
  }

  /**
   * Write out what is buffered as far as the fd takes it now, never waiting (the main
   * thread). Returns true when the buffer is empty afterwards; false when bytes remain (no
   * room in the fd, or another thread holds the buffer: try again later). A write error
   * drops what was buffered, and is thrown.
   */
  writeOutIfRoom(): boolean {
    const s = this.s;
    if (!s.tryLock()) return false;
    try {
      let length = s.get(C_LENGTH);
      try {
        while (length > 0) {
          const n = this.writer.writeIfRoom(this.data.subarray(0, length));
          if (n === 0) break;
          this.data.copyWithin(0, n, length);
          length -= n;
        }
      } catch (e) {
        length = 0;
        throw e;
      } finally {
        s.set(C_LENGTH, length);
      }
      return length === 0;
    } finally {
      s.unlock();
    }
  }

  /** Drop what is buffered (nobody reads it). False when another thread held the buffer. */
  discard(): boolean {
    if (!this.s.tryLock()) return false;
    this.s.set(C_LENGTH, 0);
    this.s.unlock();
    return true;
  }

  /** The wake-up cell and its value now, for Atomics.waitAsync. */
  wakeCell(): { cells: Int32Array; index: number; value: number } {
    return { cells: this.s.cells, index: C_WAKE + 1, value: Atomics.load(this.s.cells, C_WAKE + 1) };
  }
}

/** How long the final write-out waits for a reader that takes nothing before dropping the rest. */
export const CONSOLE_FINAL_GIVE_UP_MS = 1000;

/**
 * The main thread's side (see the file comment): start() when the vCPUs start, finish()
 * once they have all stopped.
 */
export class ConsoleFlusher {
  private ended = false;
  private wakeEnd: () => void = () => undefined;
  private readonly end = new Promise<void>((resolve) => (this.wakeEnd = resolve));
  private running: Promise<void> | undefined;

  constructor(
    private readonly buffer: ConsoleBuffer,
    /** A write failed (the output is dropped); called once. */
    private readonly onError: (e: Error) => void,
    private readonly delayMs = CONSOLE_FLUSH_DELAY_MS,
  ) {}

  start(): void {
    this.running ??= this.watch();
  }

  private failed = false;

  /** writeOutIfRoom, with its error reported once instead of thrown. */
  private writeOut(): boolean {
    try {
      return this.buffer.writeOutIfRoom();
    } catch (e) {
      if (!this.failed) this.onError(e as Error);
      this.failed = true;
      return true;
    }
  }

  private async watch(): Promise<void> {
    while (!this.ended) {
      const wake = this.buffer.wakeCell();
      if (this.buffer.pending === 0) {
        const wait = waitAsync(wake.cells, wake.index, wake.value);
        if (wait.async) await Promise.race([wait.value, this.end]);
        continue;
      }
      // The rest of the line has this long to arrive (and be written by its vCPU).
      await this.sleep(this.delayMs);
      if (!this.ended) this.writeOut();
    }
  }

  private sleep(ms: number): Promise<void> {
    return Promise.race([new Promise<void>((resolve) => setTimeout(resolve, ms)), this.end]);
  }

  /**
   * Write out what is buffered now, waiting (asynchronously) for room: resolves true once
   * the buffer is empty, false when the fd has taken nothing for `giveUpMs` (the rest
   * stays buffered). For a pause, whose console must show all the guest wrote before it.
   */
  async drain(giveUpMs = CONSOLE_FINAL_GIVE_UP_MS): Promise<boolean> {
    let progressAt = Date.now();
    let left = this.buffer.pending;
    while (!this.writeOut()) {
      const now = Date.now();
      if (this.buffer.pending < left) {
        left = this.buffer.pending;
        progressAt = now;
      } else if (now - progressAt >= giveUpMs) {
        return false;
      }
      await new Promise((resolve) => setTimeout(resolve, this.delayMs));
    }
    return true;
  }

  /**
   * Stop watching, and write out what is left (call once no thread appends any more).
   * Resolves when the buffer is empty, or the fd has taken nothing for `giveUpMs` (a reader
   * that stopped reading must not keep a stopped VM alive): then the rest is dropped.
   */
  async finish(giveUpMs = CONSOLE_FINAL_GIVE_UP_MS): Promise<void> {
    this.ended = true;
    this.wakeEnd();
    // Release the watcher's Atomics.waitAsync, if it is in one.
    const wake = this.buffer.wakeCell();
    Atomics.notify(wake.cells, wake.index);
    await this.running;
    if (!(await this.drain(giveUpMs))) this.buffer.discard();
  }
}
