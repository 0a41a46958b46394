/**
 * What every device that serves its queues in the I/O worker does on a kick, in one place.
 */
import type { Virtqueue } from "./queue";

/**
 * Serve a kick: ask the driver not to kick, `drain` the ring, interrupt once for what was
 * used, and go round again if the driver made more available meanwhile. When `drain`
 * throws (the guest broke the queue), what was used still gets its interrupt and the
 * error goes on to the caller, which breaks the device.
 */
export function serveQueue(q: Virtqueue, signalUsed: () => void, drain: () => void): void {
  try {
    do {
      q.disableNotification();
      drain();
      if (q.needsNotification()) signalUsed();
    } while (q.enableNotification());
  } catch (e) {
    if (q.needsNotification()) signalUsed();
    throw e;
  }
}

/** The one line a broken device logs and gives as its DEVICE_NEEDS_RESET reason: "virtio-rng: ...". */
export function failureReason(device: string, e: unknown): string {
  return `${device}: ${(e as Error | undefined)?.message ?? String(e)}`;
}
