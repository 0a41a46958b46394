/**
 * Kernel modules for a guest whose drivers are modules (a distribution kernel): which .ko
 * files to load, in which order, from a module tree indexed by depmod (modules.dep,
 * modules.softdep, modules.alias, modules.builtin in /lib/modules/RELEASE), as modprobe
 * would: each module's dependencies first, a "softdep pre:" before it, "post:" after.
 * The result is packed into an initramfs archive that an initrd's /init loads in order
 * (the default guest's does: guest/initrd/init).
 */
import { readFileSync, statSync } from "node:fs";
import { basename, isAbsolute, join } from "node:path";
import { BootError } from "./errors";
import { ImageReader } from "./image-reader";
import { buildInitramfs, type InitramfsEntry } from "./initramfs";
import { HDRS_MAGIC, Hdr } from "./setup-header";

/** The drivers tskvm's devices need in a Linux guest: virtio-pci, -blk, -net, and ext4 for disks made by mkdisk. */
export const GUEST_DRIVER_MODULES = ["virtio_pci", "virtio_blk", "virtio_net", "ext4"] as const;

/** The list of .ko paths (inside the initramfs), one per line, in load order. */
export const MODULE_LIST_PATH = "etc/tskvm/modules";

/** A module tree that cannot be used. Its messages name the directory. */
export class KernelModulesError extends BootError {
  constructor(problem: string, path?: string) {
    super("kernel module directory", problem, path);
  }
}

export interface KernelModule {
  /** Module name as the kernel knows it ("virtio_pci": dashes become underscores). */
  name: string;
  /** Path relative to the tree, as modules.dep gives it ("kernel/drivers/virtio/virtio_pci.ko"). */
  file: string;
}

export interface ModuleIndex {
  dir: string;
  /** By name: the module's file and its direct dependencies' names (modules.dep). */
  modules: Map<string, { file: string; deps: string[] }>;
  softdeps: Map<string, { pre: string[]; post: string[] }>;
  /** Plain (wildcard-free) aliases and the modules that provide each. */
  aliases: Map<string, string[]>;
  builtin: Set<string>;
}

export const moduleName = (file: string) => basename(file).replace(/\.ko(\.(xz|zst|gz))?$/, "").replace(/-/g, "_");

function readIndexFile(dir: string, name: string, required: boolean): string | undefined {
  try {
    return readFileSync(join(dir, name), "utf8");
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (!required && code === "ENOENT") return undefined;
    if (code === "ENOENT") {
      let isDir = false;
      try {
        isDir = statSync(dir).isDirectory();
      } catch {
        throw new KernelModulesError("does not exist", dir);
      }
      if (!isDir) throw new KernelModulesError("is not a directory", dir);
      throw new KernelModulesError(
        `has no ${name}: give the /lib/modules/RELEASE directory of the kernel, indexed by depmod (depmod -b ROOT RELEASE)`,
        dir,
      );
    }
    throw new KernelModulesError(`cannot be read (${code ?? (e as Error).message})`, dir);
  }
}

/** Read depmod's index of a module tree (the kernel's /lib/modules/RELEASE). */
export function readModuleIndex(dir: string): ModuleIndex {
  const modules = new Map<string, { file: string; deps: string[] }>();
  for (const line of readIndexFile(dir, "modules.dep", true)!.split("\n")) {
    const colon = line.indexOf(":");
    if (colon <= 0) continue;
    const file = line.slice(0, colon).trim();
    const deps = line.slice(colon + 1).trim().split(/\s+/).filter(Boolean).map(moduleName);
    modules.set(moduleName(file), { file, deps });
  }
  const softdeps = new Map<string, { pre: string[]; post: string[] }>();
  for (const line of (readIndexFile(dir, "modules.softdep", false) ?? "").split("\n")) {
    const words = line.trim().split(/\s+/);
    if (words[0] !== "softdep" || words[1] === undefined) continue;
    const entry = { pre: [] as string[], post: [] as string[] };
    let list: string[] | undefined;
    for (const w of words.slice(2)) {
      if (w === "pre:") list = entry.pre;
      else if (w === "post:") list = entry.post;
      else list?.push(w);
    }
    softdeps.set(words[1].replace(/-/g, "_"), entry);
  }
  const aliases = new Map<string, string[]>();
  for (const line of (readIndexFile(dir, "modules.alias", false) ?? "").split("\n")) {
    const [word, alias, name] = line.trim().split(/\s+/);
    if (word !== "alias" || alias === undefined || name === undefined || /[*?[]/.test(alias)) continue;
    const list = aliases.get(alias) ?? [];
    list.push(name.replace(/-/g, "_"));
    aliases.set(alias, list);
  }
  const builtin = new Set(
    (readIndexFile(dir, "modules.builtin", false) ?? "").split("\n").filter((l) => l.trim() !== "").map((l) => moduleName(l.trim())),
  );
  return { dir, modules, softdeps, aliases, builtin };
}

export interface ModulePlan {
  /** What to load, in order. */
  load: KernelModule[];
  /** Wanted modules built into the kernel (nothing to load). */
  builtin: string[];
  /** Wanted modules this kernel has neither built in nor as a module. */
  missing: string[];
}

/** The modules to load for `wanted`, dependencies (and soft dependencies) first. */
export function planModules(index: ModuleIndex, wanted: readonly string[]): ModulePlan {
  const load: KernelModule[] = [];
  const state = new Map<string, "visiting" | "done">();
  const plan: ModulePlan = { load, builtin: [], missing: [] };
  // A soft dependency may name an alias ("crypto-crc32c"): every module that provides it.
  const resolveSoft = (name: string): string[] => {
    const n = name.replace(/-/g, "_");
    if (index.modules.has(n)) return [n];
    return index.aliases.get(name) ?? index.aliases.get(n) ?? [];
  };
  const visit = (name: string, neededBy: string | undefined, soft: boolean) => {
    if (state.has(name)) return; // done, or a cycle (soft dependencies can form one): modprobe breaks it the same way
    const m = index.modules.get(name);
    if (m === undefined) {
      if (neededBy === undefined) (index.builtin.has(name) ? plan.builtin : plan.missing).push(name);
      else if (!soft && !index.builtin.has(name)) {
        throw new KernelModulesError(`lists ${neededBy} as needing ${name}, which it does not have (modules.dep)`, index.dir);
      }
      return;
    }
    state.set(name, "visiting");
    const soft1 = index.softdeps.get(name);
    for (const s of soft1?.pre ?? []) for (const p of resolveSoft(s)) visit(p, name, true);
    // modules.dep lists the deepest dependency last; loading from the end keeps every
    // module's own dependencies ahead of it even when the list's order is not complete.
    for (const d of [...m.deps].reverse()) visit(d, name, false);
    if (/\.ko\.(xz|zst|gz)$/.test(m.file)) {
      throw new KernelModulesError(
        `holds ${name} compressed (${m.file}): the guest's insmod needs plain .ko files; decompress them (xz -d / zstd -d) and run depmod again`,
        index.dir,
      );
    }
    load.push({ name, file: m.file });
    state.set(name, "done");
    for (const s of soft1?.post ?? []) for (const p of resolveSoft(s)) visit(p, name, true);
  };
  for (const w of wanted) visit(w.replace(/-/g, "_"), undefined, false);
  return plan;
}

/** The kernel release a module was built for ("6.1.0-57-amd64"), from its vermagic. */
export function moduleRelease(ko: Uint8Array): string | undefined {
  const key = Buffer.from("vermagic=");
  const at = Buffer.from(ko.buffer, ko.byteOffset, ko.byteLength).indexOf(key);
  if (at < 0) return undefined;
  const end = ko.indexOf(0, at);
  return Buffer.from(ko.subarray(at + key.length, end < 0 ? undefined : end)).toString("latin1").split(" ")[0];
}

/**
 * The release of a kernel image ("6.1.0-57-amd64"): a bzImage's kernel_version string, or
 * the "Linux version" banner in an uncompressed vmlinux. Undefined when it cannot tell.
 */
export function kernelRelease(image: Uint8Array): string | undefined {
  const r = new ImageReader(image);
  if (r.has(Hdr.HEADER, 4) && r.u32(Hdr.HEADER) === HDRS_MAGIC && r.has(Hdr.KERNEL_VERSION, 2)) {
    const at = r.u16(Hdr.KERNEL_VERSION) + 0x200;
    if (at > 0x200 && at < image.byteLength) {
      const end = image.indexOf(0, at);
      const text = Buffer.from(image.subarray(at, end < 0 ? Math.min(at + 256, image.byteLength) : end)).toString("latin1");
      return text.split(" ")[0] || undefined;
    }
    return undefined;
  }
  const banner = Buffer.from(image.buffer, image.byteOffset, image.byteLength).indexOf("Linux version ");
  if (banner < 0) return undefined;
  return Buffer.from(image.subarray(banner + 14, banner + 14 + 128)).toString("latin1").split(" ")[0] || undefined;
}

export interface ModuleArchive {
  /** A newc archive: the .ko files under lib/modules/RELEASE/ and the load list at MODULE_LIST_PATH. */
  archive: Uint8Array;
  plan: ModulePlan;
  release: string | undefined;
}

/**
 * An initramfs archive with the modules `wanted` needs from `dir`, for a kernel of release
 * `kernel` (checked against the modules' vermagic when both are known).
 */
export function moduleArchive(dir: string, wanted: readonly string[], kernel?: string): ModuleArchive {
  const index = readModuleIndex(dir);
  const plan = planModules(index, wanted);
  const entries: InitramfsEntry[] = [];
  let release: string | undefined;
  const list: string[] = [];
  for (const m of plan.load) {
    const path = isAbsolute(m.file) ? m.file : join(dir, m.file);
    let data: Uint8Array;
    try {
      data = readFileSync(path);
    } catch (e) {
      throw new KernelModulesError(`lists ${m.file}, which cannot be read (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`, dir);
    }
    release ??= moduleRelease(data);
    const inArchive = `lib/modules/${release ?? basename(dir)}/${m.file.replace(/^\/+/, "")}`;
    entries.push({ kind: "file", path: inArchive, data });
    list.push(`/${inArchive}`);
  }
  if (kernel !== undefined && release !== undefined && kernel !== release) {
    throw new KernelModulesError(`holds modules for Linux ${release}, but the kernel is ${kernel}: give that kernel's modules`, dir);
  }
  entries.push({ kind: "file", path: MODULE_LIST_PATH, data: Buffer.from(list.map((l) => `${l}\n`).join("")) });
  return { archive: buildInitramfs(entries), plan, release };
}
