/**
 * The host's entropy for virtio-rng: the kernel's getrandom(2) pool, as QEMU's and
 * Firecracker's entropy devices use it.
 */
import * as sys from "../sys/libc";
import type { EntropySource } from "../devices/virtio/rng/backend";

export const hostEntropy: EntropySource = {
  fill(buf: Uint8Array): number {
    let n = 0;
    // getrandom may return short for requests over 256 bytes; the pool never runs dry.
    while (n < buf.length) {
      const got = sys.getrandom(n === 0 ? buf : buf.subarray(n));
      if (got === 0) break;
      n += got;
    }
    return n;
  },
};
