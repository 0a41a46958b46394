/**
 * Which requests a dead vhost-user back end took off a virtqueue and never answered, read
 * from the rings alone: virtiofsd keeps that state in its own memory, cannot be asked once
 * it is gone, and offers no INFLIGHT_SHMFD.
 *
 * tskvm runs virtiofsd without a thread pool (--thread-pool-size=0): each queue's thread
 * answers its requests in the order they were made available (test/host checks it). With
 * answers in order, the unanswered requests are exactly the available-ring entries from
 * used.idx to avail.idx, whether the back end had taken them or not. (A back end answering
 * out of order would need INFLIGHT_SHMFD; from the rings alone, a simulation of random
 * orders identified the unanswered set only a quarter of the time.)
 */

export interface RingSnapshot {
  size: number;
  /** avail.idx */
  availIdx: number;
  /** used.idx */
  usedIdx: number;
  /** The head in available-ring slot `slot` (0 <= slot < size). */
  availEntry(slot: number): number;
}

/**
 * The heads of the unanswered requests, oldest first; undefined when the rings cannot be
 * right (indices more than a queue apart, a head out of range or twice): a broken driver.
 */
export function inFlightHeads(r: RingSnapshot): number[] | undefined {
  const pending = (r.availIdx - r.usedIdx) & 0xffff;
  if (pending > r.size) return undefined;
  const heads: number[] = [];
  for (let i = 0; i < pending; i++) heads.push(r.availEntry((r.usedIdx + i) & (r.size - 1)));
  if (!heads.every((h) => h < r.size) || new Set(heads).size !== heads.length) return undefined;
  return heads;
}
