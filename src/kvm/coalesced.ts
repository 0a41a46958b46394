/**
 * KVM's coalesced MMIO/PIO ring: writes to a registered zone (Vm.coalescePio) do not exit;
 * KVM appends them to a ring in a page of every vCPU's mapping (one ring per VM), and user
 * space replays them. Entries are replayed in the order the guest made them, before the
 * next exit of any vCPU is handled, so a device sees them before anything that followed.
 *
 * The ring is shared by every vCPU thread: `drain` runs under a lock cell the caller passes
 * (a SharedArrayBuffer Int32Array cell shared by all of them).
 */
import { KVM_COALESCED_MMIO_MAX, KVM_COALESCED_MMIO_PAGE_OFFSET, KvmCoalescedMmio, KvmCoalescedMmioRing } from "./abi";

const PAGE = 4096;

export class CoalescedRing {
  private readonly words: Uint32Array;
  private readonly bytes: Uint8Array;
  private readonly entries: number;
  private readonly windows: Uint8Array[];

  /** `kvmRun`: the whole vCPU mapping (KVM_GET_VCPU_MMAP_SIZE bytes). */
  constructor(kvmRun: Uint8Array) {
    const at = KVM_COALESCED_MMIO_PAGE_OFFSET * PAGE;
    if (kvmRun.byteLength < at + PAGE) throw new RangeError("the vCPU mapping has no coalesced MMIO page");
    this.bytes = kvmRun.subarray(at, at + PAGE);
    this.words = new Uint32Array(kvmRun.buffer, kvmRun.byteOffset + at, PAGE / 4);
    this.entries = KVM_COALESCED_MMIO_MAX;
    // A window of each length (1, 2, 4, 8) per entry, made once: replaying allocates nothing.
    this.windows = [];
    for (let i = 0; i < this.entries; i++) {
      const o = KvmCoalescedMmioRing.coalesced_mmio + i * KvmCoalescedMmio.size + KvmCoalescedMmio.data;
      for (const len of [1, 2, 4, 8]) this.windows.push(this.bytes.subarray(o, o + len));
    }
  }

  /** Entries waiting (a cheap check before every exit). */
  pending(): boolean {
    return Atomics.load(this.words, KvmCoalescedMmioRing.first / 4) !== Atomics.load(this.words, KvmCoalescedMmioRing.last / 4);
  }

  /**
   * Replay every waiting entry, oldest first: `pio(port, data)` or `mmio(address, data)`,
   * under the lock cell `lock[index]` (0 free, 1 held) shared by every vCPU thread.
   */
  drain(lock: Int32Array, index: number, pio: (port: number, data: Uint8Array) => void, mmio: (address: number, data: Uint8Array) => void): number {
    while (Atomics.compareExchange(lock, index, 0, 1) !== 0) Atomics.wait(lock, index, 1, 1);
    let n = 0;
    try {
      const w = this.words;
      const firstAt = KvmCoalescedMmioRing.first / 4;
      let first = Atomics.load(w, firstAt);
      const last = Atomics.load(w, KvmCoalescedMmioRing.last / 4);
      while (first !== last && first < this.entries) {
        const e = (KvmCoalescedMmioRing.coalesced_mmio + first * KvmCoalescedMmio.size) / 4;
        const address = w[e]! + w[e + 1]! * 0x1_0000_0000;
        const len = w[e + 2]!;
        const lenIndex = len === 1 ? 0 : len === 2 ? 1 : len === 4 ? 2 : 3;
        const data = this.windows[first * 4 + lenIndex]!;
        if (w[e + 3] !== 0) pio(address, data);
        else mmio(address, data);
        first = (first + 1) % this.entries;
        // Give the slot back only after it was replayed (KVM fills it again after this).
        Atomics.store(w, firstAt, first);
        n++;
      }
    } finally {
      Atomics.store(lock, index, 0);
      Atomics.notify(lock, index, 1);
    }
    return n;
  }
}
