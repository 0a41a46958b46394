/**
 * The CPUID a vCPU sees: KVM's supported set, made per-vCPU (APIC ids, topology, the
 * hypervisor bit) and filtered through a template that can hide features.
 *
 * Why hide features: an emulating host KVM (kvm-pvm) interprets guest kernel code and lacks
 * some instructions (cmpxchg16b, xsave/xrstor, popcnt, clac/stac...). A kernel that does not
 * see the CPUID bit does not use the instruction. On hardware KVM nothing needs hiding.
 */

export interface CpuidEntry {
  function: number;
  index: number;
  flags: number;
  eax: number;
  ebx: number;
  ecx: number;
  edx: number;
}

type Reg = "eax" | "ebx" | "ecx" | "edx";

export interface CpuFeature {
  /** Linux's name for the feature (as in /proc/cpuinfo). */
  readonly name: string;
  readonly leaf: number;
  readonly subleaf: number;
  readonly reg: Reg;
  readonly bit: number;
}

/** Features a template may hide. Leaf 1 ECX, leaf 7.0 EBX/ECX, extended leaf 0x80000001. */
export const CPU_FEATURES: readonly CpuFeature[] = [
  { name: "pclmulqdq", leaf: 1, subleaf: 0, reg: "ecx", bit: 1 },
  { name: "monitor", leaf: 1, subleaf: 0, reg: "ecx", bit: 3 },
  { name: "vmx", leaf: 1, subleaf: 0, reg: "ecx", bit: 5 },
  { name: "fma", leaf: 1, subleaf: 0, reg: "ecx", bit: 12 },
  { name: "cx16", leaf: 1, subleaf: 0, reg: "ecx", bit: 13 },
  { name: "pcid", leaf: 1, subleaf: 0, reg: "ecx", bit: 17 },
  { name: "movbe", leaf: 1, subleaf: 0, reg: "ecx", bit: 22 },
  { name: "popcnt", leaf: 1, subleaf: 0, reg: "ecx", bit: 23 },
  { name: "aes", leaf: 1, subleaf: 0, reg: "ecx", bit: 25 },
  { name: "xsave", leaf: 1, subleaf: 0, reg: "ecx", bit: 26 },
  { name: "osxsave", leaf: 1, subleaf: 0, reg: "ecx", bit: 27 },
  { name: "avx", leaf: 1, subleaf: 0, reg: "ecx", bit: 28 },
  { name: "f16c", leaf: 1, subleaf: 0, reg: "ecx", bit: 29 },
  { name: "rdrand", leaf: 1, subleaf: 0, reg: "ecx", bit: 30 },
  { name: "fsgsbase", leaf: 7, subleaf: 0, reg: "ebx", bit: 0 },
  { name: "bmi1", leaf: 7, subleaf: 0, reg: "ebx", bit: 3 },
  { name: "avx2", leaf: 7, subleaf: 0, reg: "ebx", bit: 5 },
  { name: "smep", leaf: 7, subleaf: 0, reg: "ebx", bit: 7 },
  { name: "bmi2", leaf: 7, subleaf: 0, reg: "ebx", bit: 8 },
  { name: "erms", leaf: 7, subleaf: 0, reg: "ebx", bit: 9 },
  { name: "invpcid", leaf: 7, subleaf: 0, reg: "ebx", bit: 10 },
  { name: "avx512f", leaf: 7, subleaf: 0, reg: "ebx", bit: 16 },
  { name: "rdseed", leaf: 7, subleaf: 0, reg: "ebx", bit: 18 },
  { name: "adx", leaf: 7, subleaf: 0, reg: "ebx", bit: 19 },
  { name: "smap", leaf: 7, subleaf: 0, reg: "ebx", bit: 20 },
  { name: "clflushopt", leaf: 7, subleaf: 0, reg: "ebx", bit: 23 },
  { name: "clwb", leaf: 7, subleaf: 0, reg: "ebx", bit: 24 },
  { name: "sha_ni", leaf: 7, subleaf: 0, reg: "ebx", bit: 29 },
  { name: "umip", leaf: 7, subleaf: 0, reg: "ecx", bit: 2 },
  { name: "pku", leaf: 7, subleaf: 0, reg: "ecx", bit: 3 },
  { name: "vaes", leaf: 7, subleaf: 0, reg: "ecx", bit: 9 },
  { name: "rdpid", leaf: 7, subleaf: 0, reg: "ecx", bit: 22 },
  { name: "la57", leaf: 7, subleaf: 0, reg: "ecx", bit: 16 },
  { name: "lahf_lm", leaf: 0x80000001, subleaf: 0, reg: "ecx", bit: 0 },
  { name: "abm", leaf: 0x80000001, subleaf: 0, reg: "ecx", bit: 5 },
  { name: "rdtscp", leaf: 0x80000001, subleaf: 0, reg: "edx", bit: 27 },
  { name: "pdpe1gb", leaf: 0x80000001, subleaf: 0, reg: "edx", bit: 26 },
  // KVM paravirtual features (leaf 0x40000001 EAX), named as QEMU's -cpu flags.
  { name: "kvm-pv-unhalt", leaf: 0x40000001, subleaf: 0, reg: "eax", bit: 7 },
  { name: "kvm-pv-ipi", leaf: 0x40000001, subleaf: 0, reg: "eax", bit: 11 },
  { name: "kvm-pv-sched-yield", leaf: 0x40000001, subleaf: 0, reg: "eax", bit: 13 },
];

/** Features that only make sense with another one present. */
const DEPENDENTS: Record<string, readonly string[]> = {
  xsave: ["osxsave", "avx", "avx2", "fma", "f16c", "avx512f", "vaes"],
  avx: ["avx2", "fma", "f16c", "avx512f", "vaes"],
  popcnt: ["abm"],
};

export interface CpuTemplate {
  readonly name: string;
  readonly description: string;
  readonly hide: readonly string[];
  /** Arguments a Linux guest needs on such a host beyond hiding features. */
  readonly linuxArgs: readonly string[];
}

export const CPU_TEMPLATES: Record<string, CpuTemplate> = {
  host: {
    name: "host",
    description: "everything KVM supports (the choice on hardware KVM)",
    hide: [],
    linuxArgs: [],
  },
  emulated: {
    name: "emulated",
    description:
      "hides what an emulating KVM (kvm-pvm) cannot execute in guest kernel mode: cx16, xsave/avx*, popcnt, smap, and the bits guest.md lists",
    hide: [
      "cx16", "xsave", "popcnt", "smap", "pcid", "rdrand", "fsgsbase", "smep",
      "invpcid", "rdseed", "clflushopt", "clwb", "umip", "pku", "la57", "movbe",
      // Hypercalls for IPIs, halted-vCPU kicks and yields never complete on kvm-pvm
      // (measured: with -c 2 an AP spun on the vmcall in __send_ipi_mask). Plain APIC IPIs work.
      "kvm-pv-unhalt", "kvm-pv-ipi", "kvm-pv-sched-yield",
    ],
    linuxArgs: [],
  },
};

export class CpuidError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CpuidError";
  }
}

/** Expand a list of feature names with their dependents; unknown names are an error. */
export function resolveHiddenFeatures(names: readonly string[]): CpuFeature[] {
  const wanted = new Set<string>();
  const add = (n: string) => {
    if (wanted.has(n)) return;
    wanted.add(n);
    for (const d of DEPENDENTS[n] ?? []) add(d);
  };
  for (const raw of names) {
    const n = raw.trim().toLowerCase();
    if (n === "") continue;
    if (!CPU_FEATURES.some((f) => f.name === n)) {
      throw new CpuidError(
        `unknown CPU feature '${raw}': known ones are ${CPU_FEATURES.map((f) => f.name).join(", ")}`,
      );
    }
    add(n);
  }
  return CPU_FEATURES.filter((f) => wanted.has(f.name));
}

export interface VcpuCpuidOptions {
  /** This vCPU's initial APIC id. */
  apicId: number;
  /** How many vCPUs the VM has (the logical processor count in leaf 1 and leaf 0xB). */
  vcpuCount: number;
  hidden: readonly CpuFeature[];
}

/**
 * The CPUID table for one vCPU. Pure: takes KVM's supported entries and returns new ones.
 */
export function vcpuCpuid(supported: readonly CpuidEntry[], opts: VcpuCpuidOptions): CpuidEntry[] {
  const entries = supported.map((e) => ({ ...e }));
  const hiddenXsave = opts.hidden.some((f) => f.name === "xsave");
  const out: CpuidEntry[] = [];
  for (const e of entries) {
    for (const f of opts.hidden) {
      if (f.leaf === e.function && f.subleaf === e.index) e[f.reg] = (e[f.reg] & ~(1 << f.bit)) >>> 0;
    }
    switch (e.function) {
      case 1:
        // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
        e.ebx = ((e.ebx & 0x0000ffff) | ((opts.vcpuCount & 0xff) << 16) | ((opts.apicId & 0xff) << 24)) >>> 0;
        // ECX[31]: running under a hypervisor. EDX[28] HTT: the count above is meaningful.
        e.ecx = (e.ecx | 0x8000_0000) >>> 0;
        if (opts.vcpuCount > 1) e.edx = (e.edx | (1 << 28)) >>> 0;
        break;
      case 4:
        // Deterministic cache parameters: EAX[31:26] = cores per package - 1 (Intel).
        if ((e.eax & 0x1f) !== 0) e.eax = ((e.eax & 0x03ffffff) | ((Math.min(opts.vcpuCount, 64) - 1) << 26)) >>> 0;
        break;
      case 0xb:
      case 0x1f:
        // Extended topology: one thread per core, vcpuCount cores in one package.
        Object.assign(e, extendedTopology(e.index, opts));
        break;
      case 0x80000008:
        // AMD: ECX[7:0] = cores - 1, ECX[15:12] = bits of the APIC id that number cores.
        e.ecx = ((e.ecx & ~0xf0ff) | (apicIdBits(opts.vcpuCount) << 12) | ((opts.vcpuCount - 1) & 0xff)) >>> 0;
        break;
      case 0x8000001e:
        // AMD extended APIC id, core id = APIC id, one thread per core, node 0.
        e.eax = opts.apicId >>> 0;
        e.ebx = opts.apicId & 0xff;
        e.ecx = 0;
        break;
      case 0xd:
        // XSAVE state enumeration is meaningless with XSAVE hidden: drop the leaf.
        if (hiddenXsave) continue;
        break;
      default:
        break;
    }
    out.push(e);
  }
  return hiddenXsave ? out : consistentXsaveLeaf(out, opts.hidden);
}

/** XCR0 state components that belong to a feature a template may hide. */
const XCR0_COMPONENTS: Record<string, readonly number[]> = {
  avx: [2], // YMM_Hi128
  avx512f: [5, 6, 7], // opmask, ZMM_Hi256, Hi16_ZMM
  pku: [9], // PKRU
};
/** The legacy area (x87, SSE: 512 bytes) and the XSAVE header (64). */
const XSAVE_LEGACY_AND_HEADER = 512 + 64;
const XSAVEC = 1 << 1;
const XSAVES = 1 << 3;

const bit = (i: number) => 1n << BigInt(i);

/** The XCR0 a guest may set: leaf 0xD sub-leaf 0, EDX:EAX (0 when XSAVE is hidden). */
export function allowedXcr0(entries: readonly CpuidEntry[]): bigint {
  const leaf0 = entries.find((e) => e.function === 0xd && e.index === 0);
  return leaf0 === undefined ? 0n : (BigInt(leaf0.edx >>> 0) << 32n) | BigInt(leaf0.eax >>> 0);
}

/**
 * Bytes an XSAVE area needs for the components in `mask`, as the CPU computes it (and KVM's
 * xstate_required_size): standard format, each component at its sub-leaf's offset (EBX);
 * compacted format, one after the other, 64-byte aligned where the sub-leaf's ECX[1] says.
 */
export function xsaveAreaSize(mask: bigint, entries: readonly CpuidEntry[], compacted: boolean): number {
  let size = XSAVE_LEGACY_AND_HEADER;
  for (let i = 2; i < 64; i++) {
    if ((mask & bit(i)) === 0n) continue;
    const sub = entries.find((e) => e.function === 0xd && e.index === i);
    if (sub === undefined) continue;
    const offset = compacted ? ((sub.ecx & 2) !== 0 ? Math.ceil(size / 64) * 64 : size) : sub.ebx;
    size = Math.max(size, offset + sub.eax);
  }
  return size;
}

/**
 * Leaf 0xD made to agree with itself and with the features the template leaves: the XCR0
 * bits offered (EAX/EDX) lose the state of hidden features and components KVM gave no
 * sub-leaf for; the sizes (EBX, ECX, and sub-leaf 1's compacted EBX) are those of exactly
 * that XCR0; sub-leaves of components not offered go. Linux compares these sizes with the
 * ones it computes from the sub-leaves ("XSAVE consistency problem" otherwise), and tskvm
 * sets the vCPU's XCR0 to this value before the guest starts (machine.ts).
 */
function consistentXsaveLeaf(entries: CpuidEntry[], hidden: readonly CpuFeature[]): CpuidEntry[] {
  const leaf0 = entries.find((e) => e.function === 0xd && e.index === 0);
  if (leaf0 === undefined) return entries;
  const sub = (i: number) => entries.find((e) => e.function === 0xd && e.index === i);
  let xcr0 = allowedXcr0(entries);
  for (const f of hidden) for (const c of XCR0_COMPONENTS[f.name] ?? []) xcr0 &= ~bit(c);
  for (let i = 2; i < 64; i++) if ((xcr0 & bit(i)) !== 0n && !((sub(i)?.eax ?? 0) > 0)) xcr0 &= ~bit(i);
  leaf0.eax = Number(xcr0 & 0xffff_ffffn) >>> 0;
  leaf0.edx = Number(xcr0 >> 32n) >>> 0;
  leaf0.ebx = xsaveAreaSize(xcr0, entries, false);
  leaf0.ecx = leaf0.ebx;
  const leaf1 = sub(1);
  // Supervisor components (IA32_XSS, sub-leaf 1 ECX/EDX) are KVM's business; keep them.
  const xss = leaf1 === undefined ? 0n : (BigInt(leaf1.edx >>> 0) << 32n) | BigInt(leaf1.ecx >>> 0);
  if (leaf1 !== undefined && (leaf1.eax & (XSAVEC | XSAVES)) !== 0) leaf1.ebx = xsaveAreaSize(xcr0 | xss, entries, true);
  return entries.filter((e) => !(e.function === 0xd && e.index >= 2 && e.index < 64 && ((xcr0 | xss) & bit(e.index)) === 0n));
}

/**
 * Linux numbers its CPU feature flags as 32 * word + bit, one word per CPUID register
 * (arch/x86/include/asm/cpufeatures.h); `clearcpuid=` takes those numbers.
 */
const LINUX_FEATURE_WORDS: readonly { leaf: number; subleaf: number; reg: Reg; word: number }[] = [
  { leaf: 1, subleaf: 0, reg: "edx", word: 0 },
  { leaf: 0x80000001, subleaf: 0, reg: "edx", word: 1 },
  { leaf: 1, subleaf: 0, reg: "ecx", word: 4 },
  { leaf: 0x80000001, subleaf: 0, reg: "ecx", word: 6 },
  { leaf: 7, subleaf: 0, reg: "ebx", word: 9 },
  { leaf: 7, subleaf: 0, reg: "ecx", word: 16 },
];

/**
 * Kernel command-line arguments that hide the same features inside a Linux guest.
 *
 * Why both: an emulating host KVM (kvm-pvm) does not intercept CPUID in guest kernel mode
 * (measured: the guest sees the host's leaf 1, XSAVE included, whatever KVM_SET_CPUID2
 * said), so on such a host only the kernel's own `noxsave` / `clearcpuid=` keep it away
 * from the instructions the host cannot emulate. On hardware KVM they are redundant.
 */
export function linuxHidingArgs(hidden: readonly CpuFeature[]): string[] {
  if (hidden.length === 0) return [];
  const bits = hidden
    .map((f) => {
      const w = LINUX_FEATURE_WORDS.find((x) => x.leaf === f.leaf && x.subleaf === f.subleaf && x.reg === f.reg);
      return w === undefined ? undefined : w.word * 32 + f.bit;
    })
    .filter((n): n is number => n !== undefined)
    .sort((a, b) => a - b);
  const args: string[] = [];
  if (hidden.some((f) => f.name === "xsave")) args.push("noxsave");
  if (bits.length > 0) args.push(`clearcpuid=${bits.join(",")}`);
  return args;
}

/** Bits of the APIC id needed to number `count` cores (the x2APIC shift of the core level). */
function apicIdBits(count: number): number {
  return count <= 1 ? 0 : Math.ceil(Math.log2(count));
}

/** Leaf 0xB/0x1F sub-leaf `index` for a package of vcpuCount single-threaded cores. */
function extendedTopology(index: number, opts: VcpuCpuidOptions): Pick<CpuidEntry, "eax" | "ebx" | "ecx" | "edx"> {
  const edx = opts.apicId >>> 0;
  if (index === 0) return { eax: 0, ebx: 1, ecx: (1 << 8) | 0, edx }; // SMT level: 1 thread
  if (index === 1) return { eax: apicIdBits(opts.vcpuCount), ebx: opts.vcpuCount, ecx: (2 << 8) | 1, edx }; // core level
  return { eax: 0, ebx: 0, ecx: index & 0xff, edx }; // no further levels
}

/** The bit of a named feature in a CPUID table, for tests and `tskvm probe`. */
export function hasFeature(entries: readonly CpuidEntry[], name: string): boolean {
  const f = CPU_FEATURES.find((x) => x.name === name);
  if (f === undefined) throw new CpuidError(`unknown CPU feature '${name}'`);
  const e = entries.find((x) => x.function === f.leaf && x.index === f.subleaf);
  return e !== undefined && (e[f.reg] & (1 << f.bit)) !== 0;
}

/** The vendor string of leaf 0 (e.g. "GenuineIntel"). */
export function vendorString(entries: readonly CpuidEntry[]): string {
  const e = entries.find((x) => x.function === 0);
  if (e === undefined) return "unknown";
  const b = Buffer.alloc(12);
  b.writeUInt32LE(e.ebx, 0);
  b.writeUInt32LE(e.edx, 4);
  b.writeUInt32LE(e.ecx, 8);
  return b.toString("latin1");
}
