/**
 * A poll(2) set for a loop that wakes often (the I/O worker): the struct pollfd array is
 * allocated once and edited in place, so a wait is one FFI crossing and no allocation,
 * where sys.poll() builds a buffer, a DataView and closures on every call.
 *
 * Entries are slots: set(slot, fd, events) fills one (events 0 keeps the slot but makes
 * the kernel skip it: poll ignores a negative fd, so a disabled slot holds -1 - fd).
 */
import koffi from "koffi";
import { Errno, SysError } from "./errors";

type Fn = (...args: any[]) => any;
let pollFn: Fn | undefined;

function bind(): Fn {
  pollFn ??= koffi.load("libc.so.6").func("poll", "int", ["void *", "unsigned long", "int"]);
  return pollFn;
}

export class PollSet {
  /** struct pollfd {int fd; short events; short revents}: as i32 [fd, events | revents << 16]. */
  private readonly fds: Int32Array;
  private readonly words: Uint16Array;
  private count = 0;
  private readonly fn: Fn;

  constructor(readonly capacity: number) {
    if (!Number.isInteger(capacity) || capacity < 1) throw new RangeError(`a poll set holds at least 1 fd, not ${capacity}`);
    this.fds = new Int32Array(2 * capacity);
    this.words = new Uint16Array(this.fds.buffer);
    this.fn = bind();
  }

  /** Slots in use: 0 .. size-1 are passed to poll. */
  get size(): number {
    return this.count;
  }

  /** Append a slot; returns its index. */
  add(fd: number, events: number): number {
    if (this.count === this.capacity) throw new RangeError(`poll set full (${this.capacity} fds)`);
    const slot = this.count++;
    this.set(slot, fd, events);
    return slot;
  }

  /** Watch `fd` for `events` in `slot`; events 0 leaves the slot out of the next waits. */
  set(slot: number, fd: number, events: number): void {
    this.fds[2 * slot] = events === 0 ? -1 - fd : fd;
    this.words[4 * slot + 2] = events;
    this.words[4 * slot + 3] = 0;
  }

  /** Change only the events of a slot (0: skip it), keeping its fd. */
  setEvents(slot: number, events: number): void {
    const cur = this.fds[2 * slot]!;
    const fd = cur < 0 ? -1 - cur : cur;
    this.fds[2 * slot] = events === 0 ? -1 - fd : fd;
    this.words[4 * slot + 2] = events;
  }

  fd(slot: number): number {
    const cur = this.fds[2 * slot]!;
    return cur < 0 ? -1 - cur : cur;
  }

  /** Wait up to timeoutMs (-1: forever); returns how many slots have revents. EINTR is retried. */
  wait(timeoutMs: number): number {
    for (;;) {
      const r = this.fn(this.fds, this.count, timeoutMs) as number;
      if (r >= 0) return r;
      const e = koffi.errno();
      if (e !== Errno.EINTR) throw new SysError("poll", e);
    }
  }

  /** What the last wait reported for `slot` (0: nothing). */
  revents(slot: number): number {
    return this.words[4 * slot + 3]!;
  }
}
