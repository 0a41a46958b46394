/**
 * Initramfs archives: the "newc" cpio format Linux unpacks into its root file system
 * (Documentation/driver-api/early-userspace/buffer-format.rst). Linux accepts several
 * archives one after the other, each starting at a 4-byte boundary, later files replacing
 * earlier ones: that is how tskvm adds kernel modules to an existing initrd
 * (appendInitramfs) without unpacking it.
 */

export type InitramfsEntry =
  | { kind: "dir"; path: string; mode?: number }
  | { kind: "file"; path: string; data: Uint8Array; mode?: number }
  | { kind: "symlink"; path: string; target: string }
  | { kind: "char"; path: string; major: number; minor: number; mode?: number };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;
const TRAILER = "TRAILER!!!";

const pad4 = (n: number) => (4 - (n % 4)) % 4;

/** Paths in an archive are relative to its root, without a leading "/" or "." parts. */
function normalise(path: string): string {
  const parts = path.split("/").filter((p) => p !== "" && p !== ".");
  if (parts.length === 0 || parts.includes("..")) throw new RangeError(`bad initramfs path '${path}'`);
  return parts.join("/");
}

/**
 * A newc archive of the entries, every file owned by root. Parent directories that are not
 * listed are added (mode 0755) before their first entry, so the kernel can create the files.
 */
export function buildInitramfs(entries: readonly InitramfsEntry[]): Uint8Array {
  const chunks: Uint8Array[] = [];
  const dirs = new Set<string>();
  let ino = 1;
  const header = (name: string, mode: number, size: number, rdev: [number, number] = [0, 0], nlink = 1) => {
    const fields = [ino++, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], Buffer.byteLength(name) + 1, 0];
    const text = `070701${fields.map((f) => f.toString(16).padStart(8, "0")).join("")}${name}\0`;
    chunks.push(Buffer.from(text + "\0".repeat(pad4(text.length)), "latin1"));
  };
  const data = (bytes: Uint8Array) => {
    chunks.push(bytes);
    if (pad4(bytes.byteLength) > 0) chunks.push(new Uint8Array(pad4(bytes.byteLength)));
  };
  const ensureParents = (path: string) => {
    const parts = path.split("/");
    for (let i = 1; i < parts.length; i++) {
      const dir = parts.slice(0, i).join("/");
      if (dirs.has(dir)) continue;
      dirs.add(dir);
      header(dir, S_IFDIR | 0o755, 0, [0, 0], 2);
    }
  };
  for (const e of entries) {
    const path = normalise(e.path);
    ensureParents(path);
    switch (e.kind) {
      case "dir":
        if (dirs.has(path)) continue;
        dirs.add(path);
        header(path, S_IFDIR | (e.mode ?? 0o755), 0, [0, 0], 2);
        break;
      case "file":
        header(path, S_IFREG | (e.mode ?? 0o644), e.data.byteLength);
        data(e.data);
        break;
      case "symlink": {
        const target = Buffer.from(e.target, "utf8");
        header(path, S_IFLNK | 0o777, target.byteLength);
        data(target);
        break;
      }
      case "char":
        header(path, S_IFCHR | (e.mode ?? 0o600), 0, [e.major, e.minor]);
        break;
    }
  }
  header(TRAILER, 0, 0, [0, 0], 1);
  return Buffer.concat(chunks);
}

/**
 * `base` followed by `extra` archives, each padded to start at a 4-byte boundary as the
 * kernel's unpacker requires (it skips the zero padding between archives). `base` may be
 * compressed: the kernel decompresses it and then goes on with what follows.
 */
export function appendInitramfs(base: Uint8Array, ...extra: readonly Uint8Array[]): Uint8Array {
  const parts: Uint8Array[] = [base];
  let length = base.byteLength;
  for (const archive of extra) {
    const gap = pad4(length);
    if (gap > 0) parts.push(new Uint8Array(gap));
    parts.push(archive);
    length += gap + archive.byteLength;
  }
  return Buffer.concat(parts);
}

/** The entries of a newc archive (no compression), for tests and diagnostics. */
export function listInitramfs(archive: Uint8Array): { path: string; mode: number; data: Uint8Array; rdev: [number, number] }[] {
  const out: { path: string; mode: number; data: Uint8Array; rdev: [number, number] }[] = [];
  let at = 0;
  const text = (from: number, len: number) => Buffer.from(archive.subarray(from, from + len)).toString("latin1");
  for (;;) {
    while (at < archive.byteLength && archive[at] === 0) at++;
    if (at >= archive.byteLength) return out;
    if (text(at, 6) !== "070701") throw new RangeError(`no newc header at offset ${at}`);
    const field = (i: number) => parseInt(text(at + 6 + i * 8, 8), 16);
    const mode = field(1);
    const size = field(6);
    const rdev: [number, number] = [field(9), field(10)];
    const nameSize = field(11);
    const nameAt = at + 110;
    const path = text(nameAt, nameSize - 1);
    const dataAt = nameAt + nameSize + pad4(110 + nameSize);
    if (dataAt + size > archive.byteLength) throw new RangeError(`truncated entry '${path}'`);
    at = dataAt + size + pad4(size);
    if (path === TRAILER) continue;
    out.push({ path, mode, data: archive.subarray(dataAt, dataAt + size), rdev });
  }
}
