/**
 * Disk images for virtio-blk: opening an image file for one VM. Every failure is a DiskImageError whose message is one line
 * that says what is wrong with which file and, where there is one, what to do about it.
 *
 * Locking: a read-write image is locked exclusively, a read-only one shared (flock with
 * LOCK_NB), so two tskvm instances never write one image and no instance reads an image
 * another writes. QEMU locks images differently (open file description locks on bytes
 * 100+ and 200+ of the file, one byte per permission), so tskvm also takes QEMU's
 * locks the way QEMU does, and so conflicts with a QEMU using the image, both ways.
 */
import * as fs from "node:fs";
import * as sys from "../sys/libc";
import { SECTOR_SIZE } from "../devices/virtio/blk/request";

export class DiskImageError extends Error {
  constructor(
    readonly path: string,
    message: string,
  ) {
    super(message);
    this.name = "DiskImageError";
  }
}

/** An open image: what the virtio-blk file engine needs. close() drops the locks. */
export interface DiskImage {
  readonly fd: number;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly path: string;
  close(): void;
}

/** QEMU's permission bits and lock byte bases (block/file-posix.c). */
const QEMU_LOCK_PERM_BASE = 100;
const QEMU_LOCK_SHARED_BASE = 200;
const QEMU_PERM_CONSISTENT_READ = 0;
const QEMU_PERM_WRITE = 1;
const QEMU_PERM_RESIZE = 3;

/**
 * Open `path` for a VM: a regular file, non-empty, a whole number of 512-byte sectors,
 * not in use by another VM in a conflicting way.
 */
export function openDiskImage(path: string, options: { readOnly?: boolean } = {}): DiskImage {
  const readOnly = options.readOnly ?? false;
  const attachRo = "attach it with ,readonly to use it read-only";

  let st: fs.Stats;
  try {
    st = fs.statSync(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw new DiskImageError(path, `disk image ${path} does not exist`);
    if (code === "ENOTDIR") throw new DiskImageError(path, `disk image ${path} does not exist (a part of the path is not a directory)`);
    if (code === "EACCES") throw new DiskImageError(path, `disk image ${path} cannot be reached: permission denied on a directory on the way`);
    throw new DiskImageError(path, `disk image ${path}: ${(e as Error).message}`);
  }
  if (st.isDirectory()) throw new DiskImageError(path, `disk image ${path} is a directory, not an image file`);
  if (!st.isFile()) throw new DiskImageError(path, `disk image ${path} is not a regular file (only image files are supported)`);

  let fd: number;
  try {
    fd = sys.open(path, readOnly ? sys.O_RDONLY : sys.O_RDWR);
  } catch (e) {
    if (!(e instanceof sys.SysError)) throw e;
    if (e.code === "EACCES" || e.code === "EPERM") {
      if (!readOnly && canRead(path)) {
        throw new DiskImageError(path, `disk image ${path} is not writable (permission denied); ${attachRo}`);
      }
      throw new DiskImageError(path, `disk image ${path} is not readable (permission denied)`);
    }
    if (e.code === "EROFS") throw new DiskImageError(path, `disk image ${path} is on a read-only file system; ${attachRo}`);
    if (e.code === "ETXTBSY") throw new DiskImageError(path, `disk image ${path} is a program being run; it cannot be opened for writing`);
    throw new DiskImageError(path, `disk image ${path} cannot be opened: ${e.message}`);
  }

  try {
    const size = fs.fstatSync(fd).size;
    if (size === 0) {
      throw new DiskImageError(path, `disk image ${path} is empty; make it a whole number of 512-byte sectors, e.g. truncate -s 64M ${path}`);
    }
    if (size % SECTOR_SIZE !== 0) {
      const padded = Math.ceil(size / SECTOR_SIZE) * SECTOR_SIZE;
      throw new DiskImageError(
        path,
        `disk image ${path} is ${size} bytes, not a multiple of 512; pad it with truncate -s ${padded} ${path}`,
      );
    }
    lockImage(fd, path, readOnly);
    let open = true;
    return {
      fd,
      sizeBytes: size,
      readOnly,
      path,
      close(): void {
        if (!open) return;
        open = false;
        sys.close(fd); // releases the flock and the OFD locks with the last reference
      },
    };
  } catch (e) {
    sys.close(fd);
    throw e;
  }
}

function canRead(path: string): boolean {
  try {
    fs.accessSync(path, fs.constants.R_OK);
    return true;
  } catch {
    return false;
  }
}

function inUse(path: string, readOnly: boolean): DiskImageError {
  return new DiskImageError(
    path,
    readOnly
      ? `disk image ${path} is in use read-write by another tskvm (or QEMU); stop it first`
      : `disk image ${path} is in use by another tskvm (or QEMU); stop it or attach with ,readonly`,
  );
}

function lockImage(fd: number, path: string, readOnly: boolean): void {
  if (!sys.flock(fd, (readOnly ? sys.LOCK_SH : sys.LOCK_EX) | sys.LOCK_NB)) throw inUse(path, readOnly);
  // QEMU's scheme: hold a read lock on PERM_BASE+p for each permission p we use and on
  // SHARED_BASE+p for each we do not let others have; before that, make sure nobody
  // denies what we use (SHARED_BASE+p locked) or uses what we deny (PERM_BASE+p locked).
  const perms = readOnly ? [QEMU_PERM_CONSISTENT_READ] : [QEMU_PERM_CONSISTENT_READ, QEMU_PERM_WRITE];
  const denied = [QEMU_PERM_WRITE, QEMU_PERM_RESIZE];
  try {
    for (const p of perms) {
      if (sys.ofdLockTest(fd, sys.F_WRLCK, QEMU_LOCK_SHARED_BASE + p, 1) !== sys.F_UNLCK) throw inUse(path, readOnly);
    }
    for (const p of denied) {
      if (sys.ofdLockTest(fd, sys.F_WRLCK, QEMU_LOCK_PERM_BASE + p, 1) !== sys.F_UNLCK) throw inUse(path, readOnly);
    }
    for (const p of perms) {
      if (!sys.ofdLock(fd, sys.F_RDLCK, QEMU_LOCK_PERM_BASE + p, 1)) throw inUse(path, readOnly);
    }
    for (const p of denied) {
      if (!sys.ofdLock(fd, sys.F_RDLCK, QEMU_LOCK_SHARED_BASE + p, 1)) throw inUse(path, readOnly);
    }
  } catch (e) {
    // A file system without byte-range locks (QEMU then does without them as well).
    if (e instanceof sys.SysError && (e.code === "ENOLCK" || e.code === "EINVAL" || e.code === "EOPNOTSUPP")) return;
    throw e;
  }
}
