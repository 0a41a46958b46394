import { test } from "node:test";
import assert from "node:assert/strict";
import {
  CPU_TEMPLATES,
  CpuidEntry,
  CpuidError,
  hasFeature,
  linuxHidingArgs,
  resolveHiddenFeatures,
  vcpuCpuid,
  vendorString,
} from "../../src/kvm/cpuid";

const entry = (fn: number, index: number, r: Partial<CpuidEntry> = {}): CpuidEntry => ({
  function: fn, index, flags: 0, eax: 0, ebx: 0, ecx: 0, edx: 0, ...r,
});

/** A supported-CPUID table shaped like KVM's on an Intel host with XSAVE and AVX2. */
const SUPPORTED: CpuidEntry[] = [
  entry(0, 0, { eax: 0x1f, ebx: 0x756e6547, edx: 0x49656e69, ecx: 0x6c65746e }),
  entry(1, 0, { eax: 0x906ea, ebx: 0x00100800, ecx: 0x7ffafbff, edx: 0xbfebfbff }),
  entry(4, 0, { eax: 0x1c004121 }),
  entry(4, 1, { eax: 0x1c004122 }),
  entry(7, 0, { ebx: 0x029c6fbf, ecx: 0x40000000 }),
  entry(0xb, 0, { eax: 1, ebx: 2, ecx: 0x100, edx: 7 }),
  entry(0xb, 1, { eax: 4, ebx: 12, ecx: 0x201, edx: 7 }),
  entry(0xd, 0, { eax: 7, ebx: 0x340, ecx: 0x340 }),
  entry(0x80000001, 0, { ecx: 0x121, edx: 0x2c100800 }),
];

test("each vCPU gets its own APIC id and the VM's processor count", () => {
  for (const id of [0, 1, 3]) {
    const t = vcpuCpuid(SUPPORTED, { apicId: id, vcpuCount: 4, hidden: [] });
    const leaf1 = t.find((e) => e.function === 1)!;
    assert.equal(leaf1.ebx >>> 24, id, "leaf 1 EBX[31:24] initial APIC id");
    assert.equal((leaf1.ebx >>> 16) & 0xff, 4, "leaf 1 EBX[23:16] logical processors");
    assert.ok((leaf1.ecx & 0x8000_0000) !== 0, "hypervisor bit");
    assert.ok((leaf1.edx & (1 << 28)) !== 0, "HTT with more than one processor");
    const smt = t.find((e) => e.function === 0xb && e.index === 0)!;
    const core = t.find((e) => e.function === 0xb && e.index === 1)!;
    assert.deepEqual([smt.eax, smt.ebx, smt.ecx >> 8, smt.edx], [0, 1, 1, id]);
    assert.deepEqual([core.eax, core.ebx, core.ecx >> 8, core.edx], [2, 4, 2, id]);
    for (const l4 of t.filter((e) => e.function === 4)) assert.equal(l4.eax >>> 26, 3, "leaf 4 cores per package - 1");
  }
  // The input is not modified.
  assert.equal(SUPPORTED.find((e) => e.function === 1)!.ebx, 0x00100800);
});

test("the emulated template hides its features, their dependents, and the XSAVE leaf", () => {
  const hidden = resolveHiddenFeatures(CPU_TEMPLATES.emulated!.hide);
  const t = vcpuCpuid(SUPPORTED, { apicId: 0, vcpuCount: 1, hidden });
  for (const f of ["cx16", "xsave", "osxsave", "avx", "avx2", "popcnt", "smap", "smep", "fsgsbase", "rdrand"]) {
    assert.equal(hasFeature(t, f), false, f);
  }
  assert.equal(hasFeature(t, "erms"), true, "features not in the template stay");
  assert.equal(t.some((e) => e.function === 0xd), false, "leaf 0xD dropped with XSAVE");
  assert.equal(hasFeature(vcpuCpuid(SUPPORTED, { apicId: 0, vcpuCount: 1, hidden: [] }), "xsave"), true);
});

test("hidden features become the kernel's own noxsave / clearcpuid numbers", () => {
  assert.deepEqual(linuxHidingArgs([]), []);
  const args = linuxHidingArgs(resolveHiddenFeatures(["cx16", "popcnt", "smap"]));
  // Linux numbering: 32 * word + bit; leaf 1 ECX is word 4, 0x80000001 ECX word 6 (abm
  // goes with popcnt), leaf 7 EBX word 9.
  assert.deepEqual(args, ["clearcpuid=141,151,197,308"]);
  const x = linuxHidingArgs(resolveHiddenFeatures(["xsave"]));
  assert.equal(x[0], "noxsave");
  assert.match(x[1]!, /clearcpuid=.*\b154\b/);
});

test("unknown feature names are an error naming the known ones", () => {
  assert.throws(() => resolveHiddenFeatures(["warp"]), (e: unknown) => e instanceof CpuidError && /unknown CPU feature 'warp'.*cx16/.test((e as Error).message));
  assert.equal(vendorString(SUPPORTED), "GenuineIntel");
});
