/** Synthetic kernel images for loader and CLI tests. */
import { writeFileSync } from "node:fs";
import { join } from "node:path";

export interface BzOptions {
  version?: number;
  setupSects?: number;
  codeBytes?: number;
  loadflags?: number;
  xloadflags?: number;
  cmdlineSize?: number;
  initrdAddrMax?: number;
  relocatable?: boolean;
  kernelAlignment?: number;
  prefAddress?: number;
  initSize?: number;
  bootFlag?: number;
  /** Drop this many bytes from the end of the file. */
  chop?: number;
}

/** A minimal bzImage: a boot sector with the setup header, setup sectors, and patterned "code". */
export function makeBzImage(o: BzOptions = {}): Uint8Array {
  const setupSects = o.setupSects ?? 1;
  const setupBytes = ((setupSects || 4) + 1) * 512;
  const codeBytes = o.codeBytes ?? 4096;
  const image = new Uint8Array(setupBytes + codeBytes);
  const v = new DataView(image.buffer);
  v.setUint8(0x1f1, setupSects);
  v.setUint32(0x1f4, codeBytes / 16, true);
  v.setUint16(0x1fe, o.bootFlag ?? 0xaa55, true);
  v.setUint8(0x200, 0xeb); // jmp short
  v.setUint8(0x201, 0x26c - 0x202); // ...to the end of the header
  image.set(Buffer.from("HdrS"), 0x202);
  v.setUint16(0x206, o.version ?? 0x020f, true);
  v.setUint8(0x211, o.loadflags ?? 0x01);
  v.setUint32(0x214, 0x100000, true);
  v.setUint32(0x22c, o.initrdAddrMax ?? 0x7fff_ffff, true);
  v.setUint32(0x230, o.kernelAlignment ?? 0x20_0000, true);
  v.setUint8(0x234, o.relocatable === false ? 0 : 1);
  v.setUint16(0x236, o.xloadflags ?? 0x1, true);
  v.setUint32(0x238, o.cmdlineSize ?? 2047, true);
  v.setBigUint64(0x258, BigInt(o.prefAddress ?? 0x100_0000), true);
  v.setUint32(0x260, o.initSize ?? 0x40_0000, true);
  for (let i = 0; i < codeBytes; i++) image[setupBytes + i] = (i * 7 + 3) & 0xff;
  return image.subarray(0, image.byteLength - (o.chop ?? 0));
}


export interface Seg {
  paddr: number;
  data: Uint8Array;
  memsz?: number;
}

export interface Note {
  name: string;
  type: number;
  desc: Uint8Array;
}

export interface ElfOptions {
  segments: Seg[];
  entry?: number;
  notes?: Note[];
  elfClass?: number;
  dataEncoding?: number;
  machine?: number;
  type?: number;
}

export const u32le = (n: number) => new Uint8Array(new Uint32Array([n]).buffer);
export const u64le = (n: number) => new Uint8Array(new BigUint64Array([BigInt(n)]).buffer);
export const pvhNote = (entry: number, size: 4 | 8 = 4): Note => ({ name: "Xen", type: 18, desc: size === 4 ? u32le(entry) : u64le(entry) });

/** Notes as Linux emits them: 4-byte aligned name and descriptor. */
export function encodeNotes(notes: Note[]): Uint8Array {
  const pad = (n: number) => Math.ceil(n / 4) * 4;
  const parts: number[] = [];
  for (const n of notes) {
    const name = Buffer.from(n.name + "\0");
    const out = new Uint8Array(12 + pad(name.length) + pad(n.desc.length));
    const v = new DataView(out.buffer);
    v.setUint32(0, name.length, true);
    v.setUint32(4, n.desc.length, true);
    v.setUint32(8, n.type, true);
    out.set(name, 12);
    out.set(n.desc, 12 + pad(name.length));
    parts.push(...out);
  }
  return Uint8Array.from(parts);
}

/** An ELF64 file: header, program headers (PT_NOTE first if any, then PT_LOADs), then data. */
export function makeElf(o: ElfOptions): Uint8Array {
  const notes = o.notes === undefined ? undefined : encodeNotes(o.notes);
  const phnum = o.segments.length + (notes === undefined ? 0 : 1);
  let offset = 64 + phnum * 56;
  const blobs: { offset: number; data: Uint8Array }[] = [];
  const place = (data: Uint8Array) => {
    offset = Math.ceil(offset / 16) * 16;
    blobs.push({ offset, data });
    offset += data.byteLength;
    return blobs[blobs.length - 1]!.offset;
  };
  const phdrs: { type: number; offset: number; paddr: number; filesz: number; memsz: number; align: number }[] = [];
  if (notes !== undefined) {
    phdrs.push({ type: 4, offset: place(notes), paddr: 0, filesz: notes.byteLength, memsz: 0, align: 4 });
  }
  for (const s of o.segments) {
    phdrs.push({ type: 1, offset: place(s.data), paddr: s.paddr, filesz: s.data.byteLength, memsz: s.memsz ?? s.data.byteLength, align: 4096 });
  }
  const file = new Uint8Array(offset);
  const v = new DataView(file.buffer);
  file.set([0x7f, 0x45, 0x4c, 0x46, o.elfClass ?? 2, o.dataEncoding ?? 1, 1]);
  v.setUint16(0x10, o.type ?? 2, true);
  v.setUint16(0x12, o.machine ?? 62, true);
  v.setUint32(0x14, 1, true);
  v.setBigUint64(0x18, BigInt(o.entry ?? o.segments[0]?.paddr ?? 0), true);
  v.setBigUint64(0x20, 64n, true);
  v.setUint16(0x34, 64, true);
  v.setUint16(0x36, 56, true);
  v.setUint16(0x38, phnum, true);
  phdrs.forEach((p, i) => {
    const at = 64 + i * 56;
    v.setUint32(at, p.type, true);
    v.setUint32(at + 4, 5, true);
    v.setBigUint64(at + 0x08, BigInt(p.offset), true);
    v.setBigUint64(at + 0x10, BigInt(p.paddr) + 0xffff_ffff_8000_0000n, true);
    v.setBigUint64(at + 0x18, BigInt(p.paddr), true);
    v.setBigUint64(at + 0x20, BigInt(p.filesz), true);
    v.setBigUint64(at + 0x28, BigInt(p.memsz), true);
    v.setBigUint64(at + 0x30, BigInt(p.align), true);
  });
  for (const b of blobs) file.set(b.data, b.offset);
  return file;
}


/** Where tiny 64-bit test kernels are loaded (and entered, through the Linux 64-bit entry). */
export const TINY_KERNEL_AT = 0x100_0000;

/** Write `code` as a tiny ELF kernel `dir/name` loaded and entered at TINY_KERNEL_AT; its path. */
export function writeTinyKernel(dir: string, name: string, code: Uint8Array): string {
  const p = join(dir, name);
  writeFileSync(p, makeElf({ segments: [{ paddr: TINY_KERNEL_AT, data: code }], entry: TINY_KERNEL_AT }));
  return p;
}
