/**
 * What virtio-rng needs of the host: random bytes. The host's implementation reads the
 * kernel's getrandom(2) (src/host/entropy.ts); tests hand in a fake.
 */
export interface EntropySource {
  /**
   * Fill `buf` with random bytes, as many as are available now without blocking; returns
   * how many (0: none right now). Throws when the source has failed for good.
   */
  fill(buf: Uint8Array): number;
}
