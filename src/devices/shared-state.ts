/**
 * Device register state that every vCPU thread (and the main thread) sees: a
 * SharedArrayBuffer holding 32-bit cells, the first of which is a small lock.
 *
 * Each thread builds its own device object over the same buffer, so any vCPU can drive any
 * device; the lock keeps a multi-register update (say, a UART FIFO push and its interrupt
 * status) atomic with respect to the other threads.
 */
export class SharedState {
  readonly buffer: SharedArrayBuffer;
  readonly cells: Int32Array;

  /** `cellCount` cells for the device, plus cell 0 for the lock. */
  static create(cellCount: number, extraBytes = 0): SharedState {
    return new SharedState(new SharedArrayBuffer(4 * (cellCount + 1) + extraBytes), cellCount);
  }

  constructor(buffer: SharedArrayBuffer, readonly cellCount: number) {
    this.buffer = buffer;
    this.cells = new Int32Array(buffer, 0, cellCount + 1);
  }

  /** Bytes after the cells, for buffers such as a FIFO. */
  bytes(): Uint8Array {
    return new Uint8Array(this.buffer, 4 * (this.cellCount + 1));
  }

  get(cell: number): number {
    return Atomics.load(this.cells, cell + 1);
  }

  set(cell: number, value: number): void {
    Atomics.store(this.cells, cell + 1, value);
  }

  /*
   * The lock cell: 0 free, 1 held, 2 held and a thread may be sleeping on it (a futex
   * mutex, as in Drepper's "Futexes Are Tricky"): unlock wakes a sleeper only after one
   * said it sleeps, so the uncontended case (nearly every console exit) is two atomic
   * operations and no Atomics.notify.
   */
  lock(): void {
    const c = this.cells;
    if (Atomics.compareExchange(c, 0, 0, 1) === 0) return;
    // Critical sections are a handful of register updates: spin briefly, then sleep.
    for (let spins = 0; spins < 100; spins++) if (Atomics.compareExchange(c, 0, 0, 1) === 0) return;
    // Say a thread sleeps (2) as it takes the lock or waits; the timeout is only a safety net.
    while (Atomics.exchange(c, 0, 2) !== 0) Atomics.wait(c, 0, 2, 1);
  }

  unlock(): void {
    if (Atomics.exchange(this.cells, 0, 0) === 2) Atomics.notify(this.cells, 0, 1);
  }

  locked<T>(fn: () => T): T {
    this.lock();
    try {
      return fn();
    } finally {
      this.unlock();
    }
  }
}
