/**
 * makeDiskImage: an ext4 image of a host directory (mkfs.ext4 -d), for carrying a project's
 * tests into a guest as a virtio-blk disk. `tskvm mkdisk` is this function.
 *
 * The image is built under a temporary name beside the output and renamed into place only
 * when mkfs.ext4 has succeeded, so a failure or an interruption leaves no half-written image
 * (and never replaces an existing one). The file is sparse: unused space costs nothing.
 */
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, lstatSync, openSync, closeSync, ftruncateSync, readdirSync, renameSync, rmSync, statSync } from "node:fs";
import { basename, delimiter, dirname, join, relative, resolve, isAbsolute } from "node:path";
import { VmError, type VmStartFailure } from "./errors";
import { formatBytes } from "../vmm/machine";

export interface MakeDiskOptions {
  /** Image size in bytes. Default: the content plus room to spare (at least 64 MiB free). */
  sizeBytes?: number;
  /** Replace an existing output file (atomically). Default false: refuse. */
  force?: boolean;
  /** The file system's label (at most 16 bytes). */
  label?: string;
  /** Stop early: the partial image is removed and the promise rejects. */
  signal?: AbortSignal;
}

export interface MakeDiskResult {
  path: string;
  sizeBytes: number;
  /** Files, directories and links copied. */
  entries: number;
  /** Bytes of file content copied. */
  contentBytes: number;
}

/** Why makeDiskImage failed; `failure` as for VmStartError ("options", "input", "host"). */
export class DiskBuildError extends VmError {
  constructor(
    readonly failure: VmStartFailure,
    message: string,
  ) {
    super(message);
  }
}

const MiB = 1024 * 1024;
/** Sizes below this make mke2fs pick layouts (1 KiB blocks, tiny journals) nobody wants. */
const MIN_IMAGE_BYTES = 16 * MiB;

/** Content of a directory tree as ext4 will need it, without following symbolic links. */
export function measureTree(dir: string): { entries: number; contentBytes: number; blocksBytes: number } {
  let entries = 0;
  let contentBytes = 0;
  let blocksBytes = 4096;
  const walk = (d: string) => {
    let names: string[];
    try {
      names = readdirSync(d);
    } catch (e) {
      throw new DiskBuildError("input", `cannot read directory '${d}' (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
    }
    // A directory's own blocks: its entries (8 bytes + name, 4-byte aligned).
    blocksBytes += roundUp(names.reduce((n, name) => n + 12 + Buffer.byteLength(name), 24), 4096);
    for (const name of names) {
      const p = join(d, name);
      const st = lstatSync(p);
      entries++;
      if (st.isDirectory()) walk(p);
      else if (st.isFile()) {
        contentBytes += st.size;
        // Data blocks, plus an extent block for large files.
        blocksBytes += roundUp(st.size, 4096) + (st.size > 128 * MiB ? 4096 : 0);
      } else if (st.isSymbolicLink() && st.size >= 60) blocksBytes += 4096;
    }
  };
  walk(dir);
  return { entries, contentBytes, blocksBytes };
}

/**
 * The default size: the content's blocks with 25% slack, an inode and a little per entry,
 * plus 64 MiB for the journal and for the guest to write in, rounded up to a MiB.
 */
export function defaultImageSize(tree: { entries: number; blocksBytes: number }): number {
  return Math.max(MIN_IMAGE_BYTES, roundUp(Math.ceil(tree.blocksBytes * 1.25) + tree.entries * 1024 + 64 * MiB, MiB));
}

function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

/** mkfs.ext4 on $PATH or in the sbin directories, where e2fsprogs installs it. */
export function findMkfsExt4(): string | undefined {
  const dirs = [...(process.env.PATH ?? "").split(delimiter), "/usr/sbin", "/sbin", "/usr/local/sbin"].filter((d) => d !== "");
  for (const d of dirs) {
    const p = join(d, "mkfs.ext4");
    if (existsSync(p)) return p;
  }
  return undefined;
}

export async function makeDiskImage(sourceDir: string, outPath: string, options: MakeDiskOptions = {}): Promise<MakeDiskResult> {
  const src = resolve(sourceDir);
  const out = resolve(outPath);
  let st;
  try {
    st = statSync(src);
  } catch {
    throw new DiskBuildError("input", `directory '${sourceDir}' does not exist`);
  }
  if (!st.isDirectory()) throw new DiskBuildError("input", `'${sourceDir}' is not a directory`);
  if (options.label !== undefined && Buffer.byteLength(options.label) > 16) {
    throw new DiskBuildError("options", `label '${options.label}' is longer than ext4's 16 bytes`);
  }
  if (options.sizeBytes !== undefined && (!Number.isSafeInteger(options.sizeBytes) || options.sizeBytes < MIN_IMAGE_BYTES || options.sizeBytes % 4096 !== 0)) {
    const given = Number.isSafeInteger(options.sizeBytes) && options.sizeBytes > 0 ? formatBytes(options.sizeBytes) : String(options.sizeBytes);
    throw new DiskBuildError("options", `bad image size ${given}: an image is at least ${formatBytes(MIN_IMAGE_BYTES)} and a multiple of 4 KiB (--size)`);
  }
  const outDir = dirname(out);
  if (!existsSync(outDir) || !statSync(outDir).isDirectory()) throw new DiskBuildError("input", `cannot write '${outPath}': directory '${outDir}' does not exist`);
  const inside = relative(src, out);
  if (inside === "" || (!inside.startsWith("..") && !isAbsolute(inside))) {
    throw new DiskBuildError("input", `the image '${outPath}' would be inside the directory it is made from; write it elsewhere`);
  }
  let existing;
  try {
    existing = lstatSync(out);
  } catch {
    existing = undefined;
  }
  if (existing !== undefined) {
    if (existing.isDirectory()) throw new DiskBuildError("input", `'${outPath}' is a directory`);
    if (!options.force) throw new DiskBuildError("input", `'${outPath}' exists: give --force to replace it`);
  }
  const mkfs = findMkfsExt4();
  if (mkfs === undefined) throw new DiskBuildError("host", "mkfs.ext4 not found: install e2fsprogs (apt-get install e2fsprogs)");

  const tree = measureTree(src);
  const tmp = join(outDir, `.${basename(out)}.tskvm-${process.pid}-${randomBytes(4).toString("hex")}`);
  const cleanup = () => rmSync(tmp, { force: true });
  try {
    let size = options.sizeBytes ?? defaultImageSize(tree);
    for (let attempt = 0; ; attempt++) {
      const fd = openTemporary(tmp, outPath);
      try {
        ftruncateSync(fd, size);
      } finally {
        closeSync(fd);
      }
      const args = ["-t", "ext4", "-q", "-F", "-d", src, ...(options.label !== undefined ? ["-L", options.label] : []), tmp];
      const r = await runTool(mkfs, args, options.signal);
      if (r.code === 0) break;
      const full = /no space|could not allocate|not enough space|too many/i.test(r.stderr);
      if (full && options.sizeBytes === undefined && attempt < 4) {
        size = roundUp(size * 2, MiB);
        continue;
      }
      const why = r.stderr.trim().split("\n").filter((l) => l.trim() !== "").pop() ?? `exit status ${r.code}`;
      if (full) throw new DiskBuildError("input", `'${sourceDir}' does not fit in ${size / MiB} MiB: give a larger --size (mkfs.ext4: ${why})`);
      throw new DiskBuildError("input", `mkfs.ext4 failed on '${sourceDir}': ${why}`);
    }
    renameSync(tmp, out);
    return { path: out, sizeBytes: size, entries: tree.entries, contentBytes: tree.contentBytes };
  } catch (e) {
    cleanup();
    throw e;
  }
}

/** The image's temporary file beside OUT; a directory that takes no files (/proc, read-only, no permission) is the user's to fix. */
function openTemporary(tmp: string, outPath: string): number {
  try {
    return openSync(tmp, "w", 0o644);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const why =
      code === "EACCES" || code === "EPERM" ? "permission denied"
      : code === "EROFS" ? "a read-only file system"
      : code === "ENOSPC" || code === "EDQUOT" ? "no space left"
      : `${code ?? (e as Error).message}: no files can be made there`;
    throw new DiskBuildError("input", `cannot write '${outPath}' (${why})`);
  }
}

function runTool(path: string, args: string[], signal: AbortSignal | undefined): Promise<{ code: number; stderr: string }> {
  return new Promise((resolvePromise, reject) => {
    if (signal?.aborted) {
      reject(new DiskBuildError("input", "stopped before mkfs.ext4 ran"));
      return;
    }
    const child = spawn(path, args, { stdio: ["ignore", "pipe", "pipe"] });
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (s: string) => (stderr += s));
    child.stderr.setEncoding("utf8").on("data", (s: string) => (stderr += s));
    const onAbort = () => child.kill("SIGTERM");
    signal?.addEventListener("abort", onAbort, { once: true });
    child.on("error", (e) => {
      signal?.removeEventListener("abort", onAbort);
      reject(new DiskBuildError("host", `cannot run ${path}: ${e.message}`));
    });
    child.on("close", (code, sig) => {
      signal?.removeEventListener("abort", onAbort);
      if (signal?.aborted) reject(new DiskBuildError("input", "stopped while mkfs.ext4 ran; nothing written"));
      else resolvePromise({ code: code ?? 128 + (sig === "SIGKILL" ? 9 : 15), stderr });
    });
  });
}
