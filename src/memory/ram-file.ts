/**
 * Guest RAM in a file, for snapshots: written sparsely (a page of zeroes is a hole, never
 * data), and mapped back copy-on-write, so that restoring costs the same for 256 MiB as for
 * 8 GiB: nothing is read until the guest touches it, and the guest's writes stay private
 * to the restored VM.
 *
 * File layout: guest RAM's regions one after another in guest-physical order (the low
 * region, then those above the PCI hole), so file offset = offset in GuestMemory.adopt's
 * single mapping. The file's length is the RAM size exactly.
 *
 * Which pages are zero is known without reading them where the host can tell: in anonymous
 * RAM, a page the guest never touched has no page-table entry (/proc/self/pagemap: neither
 * present nor swapped); in a copy-on-write mapping of an earlier RAM file, a page the guest
 * never wrote that lies in a hole of that file; in shared file memory (a memfd that a
 * vhost-user back end also maps), a hole of that file. Every other page is compared with
 * zero.
 */
import * as fs from "node:fs";
import * as sys from "../sys/libc";
import { ShortTransferError, transferAt, transferBuffer } from "../sys/full-io";
import { GuestMemory, type GuestRegion, type RamRange } from "./guest-memory";

export const PAGE_SIZE = 4096;

/** A RAM file that cannot be mapped as the RAM it should be. */
export class RamFileError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "RamFileError";
  }
}

export interface RamFileStats {
  totalBytes: number;
  /** Bytes written as data (non-zero pages). */
  dataBytes: number;
  /** Pages compared with zero (the others were known to be zero from the page tables or file holes). */
  pagesRead: number;
}

const PAGEMAP_PRESENT = 1n << 63n;
const PAGEMAP_SWAPPED = 1n << 62n;
/** Set for a page of a file (or shared memory); clear for a private anonymous page, such as a copy-on-write copy. */
const PAGEMAP_FILE_OR_SHARED = 1n << 61n;
const PAGEMAP_CHUNK_PAGES = 16384;

/**
 * For each page of a region: true when it is certainly zero. `fileOffset` is the region's
 * offset in the RAM file layout (for a file-backed memory's holes).
 */
function knownZeroPages(memory: GuestMemory, region: GuestRegion, fileOffset: number): Uint8Array {
  const pages = region.size / PAGE_SIZE;
  const zero = new Uint8Array(pages);
  const backing = memory.backing;
  if (region.hostAddress === undefined || backing === undefined) return zero;
  // Other processes' writes to shared memory are not in our page tables: only holes count.
  if (backing.kind === "shared-fd") return holeMap(backing.fd, fileOffset, region.size);
  const holes = backing.kind === "file-private" ? holeMap(backing.fd, fileOffset, region.size) : undefined;
  let pagemap: number;
  try {
    pagemap = fs.openSync("/proc/self/pagemap", "r");
  } catch {
    return zero; // no pagemap (restricted /proc): every page is read
  }
  try {
    const buf = Buffer.alloc(PAGEMAP_CHUNK_PAGES * 8);
    const firstPage = Number(region.hostAddress / BigInt(PAGE_SIZE));
    for (let p = 0; p < pages; p += PAGEMAP_CHUNK_PAGES) {
      const n = Math.min(PAGEMAP_CHUNK_PAGES, pages - p);
      const got = fs.readSync(pagemap, buf, 0, n * 8, (firstPage + p) * 8);
      if (got !== n * 8) return new Uint8Array(pages);
      for (let i = 0; i < n; i++) {
        const e = buf.readBigUInt64LE(i * 8);
        const mapped = (e & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED)) !== 0n;
        if (holes === undefined) {
          zero[p + i] = mapped ? 0 : 1;
        } else {
          // A page the guest wrote is a private anonymous copy, whatever the file holds.
          const privateCopy = mapped && (e & PAGEMAP_FILE_OR_SHARED) === 0n;
          zero[p + i] = holes[p + i] === 1 && !privateCopy ? 1 : 0;
        }
      }
    }
  } finally {
    fs.closeSync(pagemap);
  }
  return zero;
}

/**
 * Call `fn(offset, length)` for each data extent (SEEK_DATA..SEEK_HOLE) of a file within
 * [start, end) (default: the whole file), in order, clipped to the range.
 */
export function forEachDataExtent(fd: number, fn: (offset: number, length: number) => void, start = 0, end = fs.fstatSync(fd).size): void {
  let pos = start;
  while (pos < end) {
    const data = sys.seekData(fd, pos, sys.SEEK_DATA);
    if (data < 0 || data >= end) break;
    const hole = sys.seekData(fd, data, sys.SEEK_HOLE);
    const dataEnd = hole < 0 ? end : Math.min(hole, end);
    fn(data, dataEnd - data);
    pos = dataEnd;
  }
}

/** For each page of [offset, offset + length) of a file: 1 when it lies in a hole. */
function holeMap(fd: number, offset: number, length: number): Uint8Array {
  const map = new Uint8Array(length / PAGE_SIZE).fill(1);
  forEachDataExtent(
    fd,
    // Partial pages count as data.
    (data, n) => map.fill(0, Math.floor((data - offset) / PAGE_SIZE), Math.ceil((data + n - offset) / PAGE_SIZE)),
    offset,
    offset + length,
  );
  return map;
}

const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);

function isZeroPage(bytes: Uint8Array, offset: number): boolean {
  return Buffer.compare(Buffer.from(bytes.buffer, bytes.byteOffset + offset, PAGE_SIZE), ZERO_PAGE) === 0;
}

/**
 * Move [offset, offset + length) of a region from or to the file at `fileOffset`: by host
 * address for mapped RAM, through the region's bytes for test memory.
 */
function transferRun(writing: boolean, fd: number, region: GuestRegion, offset: number, length: number, fileOffset: number): void {
  if (region.hostAddress !== undefined) {
    transferAt(writing ? sys.pwriteAt : sys.preadAt, writing, fd, Number(region.hostAddress) + offset, length, fileOffset);
  } else {
    transferBuffer(writing ? sys.pwrite : sys.pread, writing, fd, region.bytes.subarray(offset, offset + length), fileOffset);
  }
}

/**
 * Write guest RAM into `fd` (a new, empty file opened for writing), leaving every zero page
 * a hole, and set the file's length to the RAM size. The guest must not run meanwhile.
 */
export function writeRamFile(memory: GuestMemory, fd: number): RamFileStats {
  const stats: RamFileStats = { totalBytes: memory.totalBytes, dataBytes: 0, pagesRead: 0 };
  let fileOffset = 0;
  for (const region of memory.regions) {
    if (region.size % PAGE_SIZE !== 0) throw new RangeError(`guest RAM region at 0x${region.base.toString(16)} is not a whole number of pages`);
    const zero = knownZeroPages(memory, region, fileOffset);
    const pages = region.size / PAGE_SIZE;
    let runStart = -1;
    const flush = (endPage: number) => {
      if (runStart < 0) return;
      const length = (endPage - runStart) * PAGE_SIZE;
      transferRun(true, fd, region, runStart * PAGE_SIZE, length, fileOffset + runStart * PAGE_SIZE);
      stats.dataBytes += length;
      runStart = -1;
    };
    for (let p = 0; p < pages; p++) {
      let data = false;
      if (zero[p] === 0) {
        stats.pagesRead++;
        data = !isZeroPage(region.bytes, p * PAGE_SIZE);
      }
      if (data && runStart < 0) runStart = p;
      else if (!data) flush(p);
    }
    flush(pages);
    fileOffset += region.size;
  }
  fs.ftruncateSync(fd, memory.totalBytes);
  return stats;
}

/** Bytes of a file that are data rather than holes (what it takes on disk, roughly). */
export function fileDataBytes(fd: number): number {
  let bytes = 0;
  forEachDataExtent(fd, (_offset, length) => {
    bytes += length;
  });
  return bytes;
}

/**
 * Map a RAM file as guest RAM laid out as `layout` says (the ranges one after another in
 * the file), copy-on-write: pages are read from the file when the guest
 * first touches them, and what the guest writes stays in this process. The file must not
 * change while mapped (a private mapping still shows file changes in pages not yet
 * written): snapshot files are made read-only for that reason.
 */
export function mapRamFile(path: string, layout: readonly RamRange[]): GuestMemory {
  const totalBytes = layout.reduce((n, r) => n + r.size, 0);
  const fd = sys.open(path, sys.O_RDONLY);
  try {
    const size = fs.fstatSync(fd).size;
    // A shorter file would raise SIGBUS on the guest's first access past its end.
    if (size !== totalBytes) {
      throw new RamFileError(`${path} holds ${size} bytes of guest RAM, not ${totalBytes}: it is truncated or not this snapshot's`);
    }
    const address = sys.mmap(totalBytes, sys.PROT_READ | sys.PROT_WRITE, sys.MAP_PRIVATE | sys.MAP_NORESERVE, fd, 0);
    return GuestMemory.adopt(address, layout, { kind: "file-private", fd });
  } catch (e) {
    sys.close(fd);
    throw e;
  }
}

/**
 * Copy a RAM file's data into existing guest RAM (which must be zero): for RAM that another
 * process shares (vhost-user back ends map it), where a private file mapping cannot serve.
 * Costs a read of the file's data, never of its holes.
 */
export function readRamFileInto(path: string, memory: GuestMemory): number {
  const fd = sys.open(path, sys.O_RDONLY);
  try {
    const size = fs.fstatSync(fd).size;
    if (size !== memory.totalBytes) {
      throw new RamFileError(`${path} holds ${size} bytes of guest RAM, not ${memory.totalBytes}: it is truncated or not this snapshot's`);
    }
    let copied = 0;
    let fileOffset = 0;
    for (const region of memory.regions) {
      const base = fileOffset;
      forEachDataExtent(fd, (data, length) => {
        try {
          transferRun(false, fd, region, data - base, length, data);
        } catch (e) {
          if (e instanceof ShortTransferError) throw new RamFileError(`${path} ended early at byte ${e.offset}`);
          throw e;
        }
        copied += length;
      }, base, base + region.size);
      fileOffset += region.size;
    }
    return copied;
  } finally {
    sys.close(fd);
  }
}
