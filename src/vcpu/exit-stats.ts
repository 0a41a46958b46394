/**
 * Exits by reason, by I/O port and by MMIO address: what a guest makes the VMM handle, for
 * `tskvm boot -v` and the boot benchmark. Counting costs one typed-array increment per
 * exit in the vCPU thread; each thread keeps its own counts and hands them over as plain
 * data when it stops, and the machine adds them up.
 *
 * Only exits that reach user space are seen here; the ones KVM handles itself (in-kernel
 * PIC, PIT, LAPIC, ioeventfd) never do.
 */

/** Plain data, postMessage-able: sparse lists instead of 64 Ki-entry arrays. */
export interface ExitStatsData {
  /** [reason, count] */
  reasons: [number, number][];
  /** [port, reads, writes] */
  pio: [number, number, number][];
  /** [address, reads, writes] */
  mmio: [number, number, number][];
}

/** Distinct MMIO addresses counted individually; further ones add to one overflow entry. */
const MAX_MMIO_ADDRESSES = 4096;
/** Where MMIO accesses to addresses past the limit are counted. */
export const MMIO_OTHER = -1;

export class ExitStats {
  private readonly reasons = new Float64Array(128);
  private readonly pioReads = new Float64Array(65536);
  private readonly pioWrites = new Float64Array(65536);
  private readonly mmio = new Map<number, [number, number]>();

  /** One exit with KVM_EXIT_* `reason` (values past the table count as 127). */
  exit(reason: number): void {
    this.reasons[reason < 127 ? reason : 127]!++;
  }

  /** One port access (a string instruction's `count` accesses count once each). */
  pio(port: number, write: boolean, count = 1): void {
    if (write) this.pioWrites[port & 0xffff]! += count;
    else this.pioReads[port & 0xffff]! += count;
  }

  mmioAccess(address: number, write: boolean): void {
    let e = this.mmio.get(address);
    if (e === undefined) {
      const key = this.mmio.size < MAX_MMIO_ADDRESSES ? address : MMIO_OTHER;
      e = this.mmio.get(key);
      if (e === undefined) {
        e = [0, 0];
        this.mmio.set(key, e);
      }
    }
    e[write ? 1 : 0]++;
  }

  data(): ExitStatsData {
    const reasons: [number, number][] = [];
    this.reasons.forEach((n, r) => {
      if (n > 0) reasons.push([r, n]);
    });
    const pio: [number, number, number][] = [];
    for (let p = 0; p < 65536; p++) {
      if (this.pioReads[p]! > 0 || this.pioWrites[p]! > 0) pio.push([p, this.pioReads[p]!, this.pioWrites[p]!]);
    }
    const mmio: [number, number, number][] = [...this.mmio].map(([a, [r, w]]) => [a, r, w]);
    return { reasons, pio, mmio };
  }
}

/** Add up the counts of several vCPUs. */
export function mergeExitStats(list: readonly ExitStatsData[]): ExitStatsData {
  const add = <K>(into: Map<K, number[]>, key: K, values: number[]) => {
    const cur = into.get(key);
    if (cur === undefined) into.set(key, values.slice());
    else values.forEach((v, i) => (cur[i] = cur[i]! + v));
  };
  const reasons = new Map<number, number[]>();
  const pio = new Map<number, number[]>();
  const mmio = new Map<number, number[]>();
  for (const d of list) {
    for (const [r, n] of d.reasons) add(reasons, r, [n]);
    for (const [p, rd, wr] of d.pio) add(pio, p, [rd, wr]);
    for (const [a, rd, wr] of d.mmio) add(mmio, a, [rd, wr]);
  }
  const byKey = (a: [number, ...number[]], b: [number, ...number[]]) => a[0] - b[0];
  return {
    reasons: [...reasons].map(([r, [n]]) => [r, n!] as [number, number]).sort(byKey),
    pio: [...pio].map(([p, [rd, wr]]) => [p, rd!, wr!] as [number, number, number]).sort(byKey),
    mmio: [...mmio].map(([a, [rd, wr]]) => [a, rd!, wr!] as [number, number, number]).sort(byKey),
  };
}

export interface ExitSummaryOptions {
  /** How many ports and addresses to list (the busiest first). */
  top?: number;
  /** A name for an exit reason (KVM_EXIT_IO -> "IO"). */
  reasonName?: (reason: number) => string;
  /** What sits at a port or MMIO address ("COM1 LSR"), when known. */
  portName?: (port: number) => string | undefined;
  mmioName?: (address: number) => string | undefined;
}

/** A few lines: totals by reason, then the busiest ports and MMIO addresses. */
export function formatExitSummary(d: ExitStatsData, o: ExitSummaryOptions = {}): string {
  const top = o.top ?? 8;
  const hex = (n: number, w: number) => `0x${n.toString(16).padStart(w, "0")}`;
  const total = d.reasons.reduce((s, [, n]) => s + n, 0);
  const lines = [
    `exits to tskvm: ${total}` +
      (d.reasons.length > 0 ? ` (${d.reasons.map(([r, n]) => `${o.reasonName?.(r) ?? `reason ${r}`} ${n}`).join(", ")})` : ""),
  ];
  const busiest = <T extends [number, number, number]>(xs: readonly T[]) => [...xs].sort((a, b) => b[1] + b[2] - (a[1] + a[2])).slice(0, top);
  for (const [p, rd, wr] of busiest(d.pio)) {
    const name = o.portName?.(p);
    lines.push(`  port ${hex(p, 4)}${name !== undefined ? ` ${name}` : ""}: ${rd + wr} (${rd} in, ${wr} out)`);
  }
  for (const [a, rd, wr] of busiest(d.mmio)) {
    const name = a === MMIO_OTHER ? "other addresses" : o.mmioName?.(a);
    lines.push(`  mmio ${a === MMIO_OTHER ? "*" : hex(a, 8)}${name !== undefined ? ` ${name}` : ""}: ${rd + wr} (${rd} reads, ${wr} writes)`);
  }
  return lines.join("\n");
}
