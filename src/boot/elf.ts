/**
 * Loading an uncompressed x86-64 vmlinux (ELF64). Its PT_LOAD segments are placed at their
 * physical addresses (p_paddr); e_entry is already physical (the kernel links ENTRY as
 * phys_startup_64). A kernel built with CONFIG_PVH also carries a Xen ELF note,
 * XEN_ELFNOTE_PHYS32_ENTRY, giving the 32-bit PVH entry point.
 */
import type { GuestMemory } from "../memory/guest-memory";
import { HIGH_MEMORY_START } from "../arch/x86/layout";
import { KernelImageError, formatSize, hex } from "./errors";
import { ImageReader } from "./image-reader";
import { requireKernelRam } from "./ram";

const ELF_MAGIC = 0x464c_457f; // "\x7fELF" read little-endian
const ELFCLASS64 = 2;
const ELFDATA2LSB = 1;
const ET_EXEC = 2;
const ET_DYN = 3;
const EM_X86_64 = 62;
const PT_LOAD = 1;
const PT_NOTE = 4;
const PHDR_SIZE = 56;
const EHDR_SIZE = 64;

/** The PVH entry note: name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY. */
export const XEN_ELFNOTE_PHYS32_ENTRY = 18;
const XEN_NOTE_NAME = "Xen";

/** ELF64 header field offsets. */
const E = {
  CLASS: 4,
  DATA: 5,
  TYPE: 0x10,
  MACHINE: 0x12,
  ENTRY: 0x18,
  PHOFF: 0x20,
  PHENTSIZE: 0x36,
  PHNUM: 0x38,
} as const;

/** ELF64 program header field offsets. */
const P = {
  TYPE: 0x00,
  OFFSET: 0x08,
  PADDR: 0x18,
  FILESZ: 0x20,
  MEMSZ: 0x28,
  ALIGN: 0x30,
} as const;

export interface ElfSegment {
  /** Index in the program header table, for messages. */
  index: number;
  fileOffset: number;
  paddr: number;
  filesz: number;
  memsz: number;
}

export interface ElfKernel {
  /** e_entry: the 64-bit boot protocol entry (startup_64), physical in a vmlinux; see entryInImage. */
  entry: bigint;
  /** PT_LOAD segments with a non-zero memory size, in file order. */
  segments: ElfSegment[];
  /** The PVH 32-bit entry from the Xen PHYS32_ENTRY note, if the kernel has one. */
  pvhEntry: number | undefined;
}

export function isElf(image: Uint8Array): boolean {
  const r = new ImageReader(image);
  return r.has(0, 4) && r.u32(0) === ELF_MAGIC;
}

/** Validate the header and program headers; nothing is written. Throws KernelImageError. */
export function parseElf(image: Uint8Array): ElfKernel {
  const r = new ImageReader(image);
  if (!isElf(image)) throw new KernelImageError("is not an ELF file (no \\x7fELF magic)");
  r.need(0, EHDR_SIZE, "the ELF header");
  checkIdent(r);

  const phoff = r.u64(E.PHOFF, "e_phoff");
  const phentsize = r.u16(E.PHENTSIZE);
  const phnum = r.u16(E.PHNUM);
  if (phnum === 0) throw new KernelImageError("is an ELF file with no program headers: nothing to load");
  if (phentsize < PHDR_SIZE) {
    throw new KernelImageError(`has ELF program headers of ${phentsize} bytes; ELF64 needs ${PHDR_SIZE}`);
  }
  r.need(phoff, phentsize * phnum, `the ELF program header table (${phnum} entries)`);

  const segments: ElfSegment[] = [];
  let pvhEntry: number | undefined;
  for (let i = 0; i < phnum; i++) {
    const ph = phoff + i * phentsize;
    const type = r.u32(ph + P.TYPE);
    if (type === PT_LOAD) {
      const seg = readSegment(r, ph, i);
      if (seg.memsz > 0) segments.push(seg);
    } else if (type === PT_NOTE && pvhEntry === undefined) {
      pvhEntry = findPvhEntry(r, ph, i);
    }
  }
  if (segments.length === 0) throw new KernelImageError("is an ELF file with no loadable (PT_LOAD) segments");
  return { entry: r.u64n(E.ENTRY), segments, pvhEntry };
}

function checkIdent(r: ImageReader): void {
  if (r.u8(E.CLASS) !== ELFCLASS64) {
    throw new KernelImageError("is a 32-bit ELF file: tskvm boots 64-bit x86 vmlinux (ELFCLASS64)");
  }
  if (r.u8(E.DATA) !== ELFDATA2LSB) {
    throw new KernelImageError("is a big-endian ELF file: tskvm boots little-endian x86-64 vmlinux");
  }
  const machine = r.u16(E.MACHINE);
  if (machine !== EM_X86_64) {
    throw new KernelImageError(`is an ELF file for machine ${machine}, not x86-64 (EM_X86_64 = ${EM_X86_64})`);
  }
  const type = r.u16(E.TYPE);
  if (type === ET_DYN) {
    throw new KernelImageError("is a position-independent ELF (ET_DYN): tskvm loads an executable vmlinux (ET_EXEC)");
  }
  if (type !== ET_EXEC) throw new KernelImageError(`is an ELF file of type ${type}, not an executable (ET_EXEC)`);
}

function readSegment(r: ImageReader, ph: number, index: number): ElfSegment {
  const seg: ElfSegment = {
    index,
    fileOffset: r.u64(ph + P.OFFSET, "p_offset"),
    paddr: r.u64(ph + P.PADDR, "p_paddr"),
    filesz: r.u64(ph + P.FILESZ, "p_filesz"),
    memsz: r.u64(ph + P.MEMSZ, "p_memsz"),
  };
  if (seg.filesz > seg.memsz) {
    throw new KernelImageError(
      `has a malformed ELF segment ${index}: file size ${hex(seg.filesz)} exceeds memory size ${hex(seg.memsz)}`,
    );
  }
  r.need(seg.fileOffset, seg.filesz, `ELF segment ${index}`);
  return seg;
}

/**
 * Walk the notes of one PT_NOTE segment for Xen's PHYS32_ENTRY. Each note is namesz, descsz
 * and type (u32 each), then the name and the descriptor, each padded to the note alignment
 * (4 bytes as Linux emits them; 8 when the segment says so).
 */
function findPvhEntry(r: ImageReader, ph: number, index: number): number | undefined {
  const offset = r.u64(ph + P.OFFSET, "p_offset");
  const size = r.u64(ph + P.FILESZ, "p_filesz");
  const align = r.u64(ph + P.ALIGN, "p_align") === 8 ? 8 : 4;
  r.need(offset, size, `ELF note segment ${index}`);
  const pad = (n: number) => Math.ceil(n / align) * align;
  const end = offset + size;
  let at = offset;
  while (end - at >= 12) {
    const namesz = r.u32(at);
    const descsz = r.u32(at + 4);
    const type = r.u32(at + 8);
    const name = at + 12;
    const desc = name + pad(namesz);
    const next = desc + pad(descsz);
    if (next > end) {
      throw new KernelImageError(`has a malformed ELF note in segment ${index} at file offset ${hex(at)}`);
    }
    if (type === XEN_ELFNOTE_PHYS32_ENTRY && noteName(r, name, namesz) === XEN_NOTE_NAME) {
      return pvhEntryValue(r, desc, descsz);
    }
    at = next;
  }
  return undefined;
}

function noteName(r: ImageReader, at: number, size: number): string {
  // The name includes its NUL terminator.
  const bytes = r.slice(at, size, "an ELF note name");
  const nul = bytes.indexOf(0);
  return Buffer.from(nul < 0 ? bytes : bytes.subarray(0, nul)).toString("latin1");
}

/** The note's value is a 32-bit physical address (some kernels store it in a 64-bit word). */
function pvhEntryValue(r: ImageReader, desc: number, descsz: number): number {
  if (descsz !== 4 && descsz !== 8) {
    throw new KernelImageError(`has a Xen PHYS32_ENTRY note of ${descsz} bytes; expected a 4- or 8-byte address`);
  }
  if (descsz === 8 && r.u32(desc + 4) !== 0) {
    throw new KernelImageError("has a PVH entry point above 4 GiB in its Xen PHYS32_ENTRY note");
  }
  return r.u32(desc);
}

/**
 * Check that an entry point lies in a loaded segment and return it: a virtual e_entry, or a
 * note pointing elsewhere, would otherwise start the guest in memory holding no code.
 */
export function entryInImage(elf: ElfKernel, address: bigint | number, what: string): number {
  const a = BigInt(address);
  const inside = elf.segments.some((s) => a >= BigInt(s.paddr) && a < BigInt(s.paddr + s.filesz));
  if (!inside) {
    throw new KernelImageError(
      `has its ${what} at 0x${a.toString(16)}, outside every loaded segment (is it a virtual address?)`,
    );
  }
  return Number(a);
}

export interface LoadedElf {
  kernelStart: number;
  kernelEnd: number;
}

/**
 * Copy each PT_LOAD segment to p_paddr and zero its tail (memsz beyond filesz: .bss and
 * friends). Every segment is checked before anything is written, so a failure leaves RAM
 * untouched.
 */
export function loadElf(mem: GuestMemory, elf: ElfKernel, image: Uint8Array): LoadedElf {
  for (const seg of elf.segments) {
    if (seg.paddr < HIGH_MEMORY_START) {
      throw new KernelImageError(
        `has ELF segment ${seg.index} at ${hex(seg.paddr)}, below 1 MiB where tskvm keeps its boot structures`,
      );
    }
    requireKernelRam(mem, seg.paddr, seg.memsz, `ELF segment ${seg.index}, ${formatSize(seg.memsz)}`);
  }
  for (const seg of elf.segments) {
    mem.write(seg.paddr, image.subarray(seg.fileOffset, seg.fileOffset + seg.filesz));
    mem.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz);
  }
  return {
    kernelStart: Math.min(...elf.segments.map((s) => s.paddr)),
    kernelEnd: Math.max(...elf.segments.map((s) => s.paddr + s.memsz)),
  };
}
