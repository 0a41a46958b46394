/**
 * The layers of src/ and the rule between them, in one place (docs/architecture.md draws
 * the same table): a module may import only from its own layer or from layers listed
 * before it. Folders in one layer are peers. EXTRA_RULES name lower layers a folder must
 * not use at all (device models make no system call and do not drive KVM themselves).
 *
 * scripts/ and test/ are outside the rule: they may import anything.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import ts from "typescript";

export interface Layer {
  /** The top-level folders under src/ in this layer. */
  readonly folders: readonly string[];
  readonly what: string;
}

/** Files directly in src/ (the package entry, index.ts) are above every layer. */
export const ENTRY = "(src/)";

export const LAYERS: readonly Layer[] = [
  { folders: ["sys"], what: "the only FFI: libc through koffi, full-transfer helpers" },
  { folders: ["memory"], what: "guest memory: regions, the one bounds check, iovecs" },
  { folders: ["kvm", "arch"], what: "KVM handles and decoded exits; x86 layout and tables" },
  { folders: ["boot", "devices"], what: "Linux loaders; pure device models" },
  { folders: ["host"], what: "host-side back ends: disk files, TAP, helper processes" },
  { folders: ["board"], what: "per-thread device wiring: plain-data specs and their instantiation" },
  { folders: ["vcpu", "io"], what: "the vCPU and I/O worker runtimes" },
  { folders: ["vmm"], what: "the machine: builds and runs everything" },
  { folders: ["api"], what: "the TypeScript API" },
  { folders: ["cli"], what: "the command line: flags, console, exit codes" },
];

/** Device models (devices/) reach the host only through interfaces they declare. */
export const EXTRA_RULES: readonly { folder: string; mayNotUse: readonly string[]; why: string }[] = [
  { folder: "devices", mayNotUse: ["sys", "kvm"], why: "device models make no system call and reach KVM only through interfaces (IrqLine, hooks)" },
];

export interface SourceFile {
  /** Path relative to src/, with "/" separators: "devices/virtio/queue.ts". */
  readonly path: string;
  readonly text: string;
}

export interface Violation {
  readonly file: string;
  readonly imports: string;
  readonly why: string;
}

/** The top-level folder of a src-relative path, or ENTRY for a file directly in src/. */
export function folderOf(srcPath: string): string {
  const parts = srcPath.split("/");
  return parts.length === 1 ? ENTRY : parts[0]!;
}

/** The rank of a folder (index in LAYERS; ENTRY above all), or -1 when no layer holds it. */
export function rankOf(folder: string): number {
  if (folder === ENTRY) return LAYERS.length;
  return LAYERS.findIndex((l) => l.folders.includes(folder));
}

/** Every module specifier a file imports or re-exports (type-only ones and dynamic import() too). */
export function importsOf(text: string): string[] {
  return ts.preProcessFile(text, true, true).importedFiles.map((f) => f.fileName);
}

/**
 * Check every file's relative imports against the layers. `exists(p)` says whether the
 * src-relative file p exists (to resolve "./x" to x.ts or x/index.ts).
 */
export function checkLayers(files: readonly SourceFile[], exists: (srcPath: string) => boolean): Violation[] {
  const out: Violation[] = [];
  for (const f of files) {
    const from = folderOf(f.path);
    const fromRank = rankOf(from);
    if (fromRank < 0) {
      out.push({ file: f.path, imports: "", why: `folder ${from}/ is in no layer: add it to LAYERS (test/helpers/layers.ts) and docs/architecture.md` });
      continue;
    }
    for (const spec of importsOf(f.text)) {
      if (!spec.startsWith(".")) continue; // node:, koffi: outside src
      const target = resolveImport(f.path, spec, exists);
      if (target === undefined) {
        out.push({ file: f.path, imports: spec, why: "cannot be resolved to a file under src/" });
        continue;
      }
      const to = folderOf(target);
      const toRank = rankOf(to);
      if (toRank < 0) {
        out.push({ file: f.path, imports: spec, why: `${target} is outside every layer` });
      } else if (toRank > fromRank) {
        out.push({ file: f.path, imports: spec, why: `${from}/ (layer ${fromRank + 1}) imports from ${to}/, a layer above it (${toRank + 1})` });
      } else {
        const extra = EXTRA_RULES.find((r) => r.folder === from && r.mayNotUse.includes(to));
        if (extra !== undefined) out.push({ file: f.path, imports: spec, why: `${from}/ may not use ${to}/: ${extra.why}` });
      }
    }
  }
  return out;
}

/** The src-relative file a relative specifier in `fromPath` names, or undefined. */
function resolveImport(fromPath: string, spec: string, exists: (srcPath: string) => boolean): string | undefined {
  const base = path.posix.normalize(path.posix.join(path.posix.dirname(fromPath), spec));
  if (base.startsWith("..")) return undefined; // leaves src/
  for (const candidate of [`${base}.ts`, `${base}/index.ts`, base]) {
    if (candidate.endsWith(".ts") && exists(candidate)) return candidate;
  }
  return undefined;
}

/** Every .ts file under `srcDir`, as SourceFiles. */
export function readSources(srcDir: string): SourceFile[] {
  const out: SourceFile[] = [];
  const walk = (dir: string): void => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith(".ts")) out.push({ path: path.relative(srcDir, p).split(path.sep).join("/"), text: fs.readFileSync(p, "utf8") });
    }
  };
  walk(srcDir);
  return out;
}
