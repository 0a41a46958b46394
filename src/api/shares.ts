/**
 * Host directories shared with the guest over virtio-fs (`shares` in startVm(), `--share`
 * on the CLI), and how the default guest learns where to mount them: one kernel argument
 * per share, `tskvm.share=<tag>,<ro|rw>,<path>`, read by its /init, which mounts each at the
 * same path as on the host. With `rootfs: "host"` the host's root file system is one more
 * share, read-only, that /init puts under a tmpfs overlay and runs commands in.
 */
import { resolve } from "node:path";
import { shellQuote } from "./protocol";
import { onOff, splitOptionList } from "./option-values";

export interface ShareOptions {
  /** The host directory (relative paths are taken from the current directory). */
  path: string;
  /** The virtio-fs tag (1-36 of A-Z a-z 0-9 . _ -). Default: from the directory's name. */
  tag?: string;
  /** Refuse every write (EROFS), enforced on the host. Default false. */
  readOnly?: boolean;
}

export interface Share {
  /** Absolute host path; also where the default guest mounts it. */
  hostPath: string;
  tag: string;
  readOnly: boolean;
}

/** The tag of the host's root file system with `rootfs: "host"`. */
export const ROOTFS_TAG = "tskvm-rootfs";

/** virtio-fs's config `tag` field is 36 bytes. */
export const MAX_TAG_BYTES = 36;
const TAG = /^[A-Za-z0-9._-]{1,36}$/;

/** A share that cannot be set up as asked: the caller's mistake (CLI exit status 2). */
export class ShareOptionError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ShareOptionError";
  }
}

/**
 * A share given as text, "path[,tag=NAME][,readonly]" (the API's string shares, the CLI's
 * --share). A path containing a comma cannot be given this way (as with disks); use the
 * object form.
 */
export function parseShareOption(spec: string): ShareOptions {
  const { head: path, options } = splitOptionList(spec);
  if (path === "") throw new ShareOptionError(`share "${spec}" has no directory (expected DIR[,tag=NAME][,readonly])`);
  const out: ShareOptions = { path };
  for (const { text: opt, key, value } of options) {
    if (key === "readonly" || key === "ro") {
      const on = onOff(value);
      if (on === undefined) throw new ShareOptionError(`share option "${opt}" in "${spec}": readonly takes on or off`);
      out.readOnly = on;
    } else if (key === "tag" && value !== undefined) {
      out.tag = value;
    } else {
      throw new ShareOptionError(`unknown share option "${opt}" in "${spec}" (known: tag=NAME, readonly)`);
    }
  }
  return out;
}

/** Guest directories a share may not cover: the guest's own root and kernel file systems. */
const GUEST_OWNED = ["/", "/proc", "/sys", "/dev"];

/**
 * Absolute paths, tags (given ones checked, missing ones made from the directory's name,
 * unique), read-only flags. Throws ShareOptionError for a bad or clashing tag, the same
 * directory twice, or a directory the guest cannot have mounted over.
 */
export function resolveShares(shares: readonly ShareOptions[], opts: { rootfsHost?: boolean; cwd?: string } = {}): Share[] {
  const cwd = opts.cwd ?? process.cwd();
  const taken = new Map<string, string>();
  if (opts.rootfsHost === true) taken.set(ROOTFS_TAG, "the host's root file system (--rootfs host)");
  const out: Share[] = [];
  for (const s of shares.filter((x) => x.tag !== undefined)) {
    if (!TAG.test(s.tag!)) {
      throw new ShareOptionError(`share tag "${s.tag}": use 1 to ${MAX_TAG_BYTES} letters, digits, '.', '_' or '-'`);
    }
  }
  for (const s of shares) {
    if (s.path === "") throw new ShareOptionError("a share needs a host directory");
    const hostPath = resolve(cwd, s.path);
    const owned = GUEST_OWNED.find((p) => hostPath === p || (p !== "/" && hostPath.startsWith(`${p}/`)));
    if (owned !== undefined) {
      const why = owned === "/" ? "the guest's root; use --rootfs host for the host's root file system" : `the guest needs its own ${owned}`;
      throw new ShareOptionError(`cannot share ${hostPath} at the same path in the guest: ${why}`);
    }
    const twice = out.find((o) => o.hostPath === hostPath);
    if (twice !== undefined) throw new ShareOptionError(`${hostPath} is shared twice (tags ${twice.tag} and ${s.tag ?? "default"})`);
    let tag = s.tag;
    if (tag !== undefined) {
      const other = taken.get(tag);
      if (other !== undefined) throw new ShareOptionError(`share tag "${tag}" is used twice (${other} and ${hostPath})`);
    } else {
      tag = uniqueTag(defaultTag(hostPath), taken, shares);
    }
    taken.set(tag, hostPath);
    out.push({ hostPath, tag, readOnly: s.readOnly === true });
  }
  return out;
}

/** A tag from the directory's last name: unsupported characters become '_', cut to 32 bytes. */
function defaultTag(hostPath: string): string {
  const name = hostPath.split("/").filter((p) => p !== "").at(-1) ?? "share";
  const tag = name.replace(/[^A-Za-z0-9._-]/g, "_").slice(0, MAX_TAG_BYTES - 4);
  return tag === "" ? "share" : tag;
}

/** `base`, or `base-2`, `base-3`, ... avoiding tags taken or asked for explicitly. */
function uniqueTag(base: string, taken: ReadonlyMap<string, string>, asked: readonly ShareOptions[]): string {
  const reserved = new Set([...taken.keys(), ...asked.flatMap((s) => (s.tag === undefined ? [] : [s.tag]))]);
  if (!reserved.has(base)) return base;
  for (let n = 2; ; n++) if (!reserved.has(`${base}-${n}`)) return `${base}-${n}`;
}

/**
 * A path for the kernel command line: bytes outside [A-Za-z0-9/._+-] as \0NNN (octal,
 * what the guest's `printf %b` decodes), so it is one argument with nothing the kernel or
 * /init's word splitting would touch.
 */
export function encodeGuestPath(path: string): string {
  let out = "";
  for (const b of Buffer.from(path, "utf8")) {
    const c = String.fromCharCode(b);
    out += /[A-Za-z0-9/._+-]/.test(c) ? c : `\\0${b.toString(8).padStart(3, "0")}`;
  }
  return out;
}

/** The default guest's kernel arguments that make /init mount `shares` (and the host's root). */
export function shareKernelArgs(shares: readonly Share[], rootfsHost = false): string[] {
  const args = shares.map((s) => `tskvm.share=${s.tag},${s.readOnly ? "ro" : "rw"},${encodeGuestPath(s.hostPath)}`);
  if (rootfsHost) args.unshift(`tskvm.rootfs=${ROOTFS_TAG}`);
  return args;
}

/** The shell command that mounts `share` at its path in the default guest (e.g. after a restore). */
export function shareMountCommand(share: Share): string {
  const p = shellQuote(share.hostPath);
  return `mkdir -p -- ${p} && mount -t virtiofs -o ${share.readOnly ? "ro" : "rw"} ${share.tag} ${p}`;
}

/**
 * Where a command should run in the guest so that it sees `cwd` (the user's current
 * directory): `cwd` itself when it is inside a share (mounted at the same path), else undefined.
 */
export function guestDirectoryFor(cwd: string, shares: readonly Share[]): string | undefined {
  const inside = shares.some((s) => cwd === s.hostPath || cwd.startsWith(s.hostPath.endsWith("/") ? s.hostPath : `${s.hostPath}/`));
  return inside ? cwd : undefined;
}

/**
 * Directories the default guest gives its own file systems under `--rootfs host`
 * (guest/initrd/init: the kernel's proc, sys and dev, a fresh tmpfs on /tmp and /run):
 * the host's files there are not what the guest sees.
 */
export const ROOTFS_GUEST_OWN_DIRECTORIES = ["/tmp", "/run", "/proc", "/sys", "/dev"] as const;

/**
 * With `--rootfs host`, the directory of the guest's own that hides `cwd` (a host path),
 * or undefined when the guest sees `cwd` as the host has it (unless a share covers it).
 */
export function rootfsHostHides(cwd: string): string | undefined {
  return ROOTFS_GUEST_OWN_DIRECTORIES.find((d) => cwd === d || cwd.startsWith(`${d}/`));
}
