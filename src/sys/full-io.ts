/**
 * Transfers that finish: a pread/pwrite (by address, by buffer or vectored) that the kernel
 * completed only in part is continued until every byte has moved. One loop for all of
 * them, so no caller repeats it. A call that moves nothing (a read at end of file, a write
 * the file system refuses without an errno) is a ShortTransferError.
 *
 * Each helper takes the call to make as its first argument (the libc one from libc.ts, or
 * a test's observing wrapper), so that the loop and the choice of call stay apart.
 */

/** A transfer that stopped: nothing more could be read (end of file) or written. */
export class ShortTransferError extends Error {
  constructor(
    readonly writing: boolean,
    /** File offset of the first byte that did not move. */
    readonly offset: number,
  ) {
    super(`${writing ? "nothing written" : "end of file"} at byte ${offset}`);
    this.name = "ShortTransferError";
  }
}

/** pread/pwrite with the buffer as a host address (preadAt, pwriteAt). */
export type TransferAt = (fd: number, address: number, length: number, offset: number) => number;
/** pread/pwrite with the buffer as a typed array (pread, pwrite). */
export type TransferBuffer = (fd: number, buf: Uint8Array, offset: number) => number;
/** preadv/pwritev over `count` struct iovec in `iov` (preadv, pwritev). */
export type TransferVector = (fd: number, iov: Uint8Array, count: number, offset: number) => number;

/** Move `length` bytes at host `address` from or to file offset `offset`. */
export function transferAt(call: TransferAt, writing: boolean, fd: number, address: number, length: number, offset: number): void {
  for (let done = 0; done < length; ) {
    const k = call(fd, address + done, length - done, offset + done);
    if (k <= 0) throw new ShortTransferError(writing, offset + done);
    done += k;
  }
}

/** Move all of `buf` from or to file offset `offset`. */
export function transferBuffer(call: TransferBuffer, writing: boolean, fd: number, buf: Uint8Array, offset: number): void {
  for (let done = 0; done < buf.byteLength; ) {
    const k = call(fd, done === 0 ? buf : buf.subarray(done), offset + done);
    if (k <= 0) throw new ShortTransferError(writing, offset + done);
    done += k;
  }
}

/**
 * Move the `count` iovecs in `iov` (16 bytes each: u64 base address, u64 length, host byte
 * order), `length` bytes in all, from or to file offset `offset`. After a partial transfer
 * the entries are rewritten in place to describe what is left, so `iov` must be the
 * caller's scratch. `alreadyDone`: the bytes a first call made elsewhere (an io_uring
 * completion) already moved; the loop goes on from there.
 */
export function transferVector(
  call: TransferVector,
  writing: boolean,
  fd: number,
  iov: Uint8Array,
  count: number,
  offset: number,
  length: number,
  alreadyDone?: number,
): void {
  let done = alreadyDone ?? call(fd, iov, count, offset);
  if (done === length) return;
  if (done <= 0) throw new ShortTransferError(writing, offset);
  const words = new DataView(iov.buffer, iov.byteOffset, iov.byteLength);
  let first = 0;
  for (;;) {
    // Skip the entries the call finished; trim the one it stopped inside.
    let left = done;
    while (first < count) {
      const len = Number(words.getBigUint64(16 * first + 8, true));
      if (left < len) {
        if (left > 0) {
          words.setBigUint64(16 * first, words.getBigUint64(16 * first, true) + BigInt(left), true);
          words.setBigUint64(16 * first + 8, BigInt(len - left), true);
        }
        break;
      }
      left -= len;
      first++;
    }
    offset += done;
    length -= done;
    if (first === count || length <= 0) return;
    done = call(fd, iov.subarray(16 * first), count - first, offset);
    if (done <= 0) throw new ShortTransferError(writing, offset);
  }
}
