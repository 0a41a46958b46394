/**
 * Register blocks described as a table of fields (offset, width, read, write), and the two
 * rules for turning a bus access of any size into field accesses:
 *
 * - A read fills each byte from the field that covers it (each field read once per access;
 *   bytes no field covers read 0). A 4-byte read of two 16-bit fields reads both.
 * - A write reaches only the fields it covers completely. Drivers must use each field's
 *   natural width (spec 4.1.3.1), so a partial write to, say, queue_enable has no meaning
 *   worth guessing; an 8-byte write of a lo/hi pair reaches both halves.
 */
export interface Field {
  readonly offset: number;
  readonly width: 1 | 2 | 4;
  read(): number;
  /** Absent: read-only, writes are dropped. */
  write?(value: number): void;
}

export function readFields(fields: readonly Field[], offset: number, data: Uint8Array): void {
  data.fill(0);
  const end = offset + data.length;
  for (const f of fields) {
    const lo = Math.max(offset, f.offset);
    const hi = Math.min(end, f.offset + f.width);
    if (lo >= hi) continue;
    const value = f.read();
    for (let a = lo; a < hi; a++) data[a - offset] = (value >>> (8 * (a - f.offset))) & 0xff;
  }
}

export function writeFields(fields: readonly Field[], offset: number, data: Uint8Array): void {
  const end = offset + data.length;
  for (const f of fields) {
    if (f.write === undefined || f.offset < offset || f.offset + f.width > end) continue;
    let value = 0;
    for (let i = f.width - 1; i >= 0; i--) value = value * 256 + data[f.offset - offset + i]!;
    f.write(value);
  }
}
