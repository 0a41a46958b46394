/**
 * CPUID leaf 0xD (XSAVE) as tskvm hands it to the guest: the XCR0 it offers, the area sizes
 * of exactly that XCR0 (what Linux checks: "XSAVE consistency problem" otherwise), and no
 * sub-leaf for a component it does not offer.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { allowedXcr0, resolveHiddenFeatures, vcpuCpuid, xsaveAreaSize, type CpuidEntry } from "../../src/kvm/cpuid";

const SIGNIFICANT_INDEX = 1;
const entry = (fn: number, index: number, eax: number, ebx: number, ecx: number, edx: number): CpuidEntry => ({
  function: fn, index, flags: fn === 0xd ? SIGNIFICANT_INDEX : 0, eax, ebx, ecx, edx,
});

/**
 * KVM's supported leaf 0xD on the harness VM's CPU (QEMU TCG "max"): x87, SSE, AVX and PKRU,
 * PKRU at its architectural offset 2688, XSAVEC; sizes as KVM reports them for XCR0 = x87.
 */
const supported: CpuidEntry[] = [
  entry(1, 0, 0x000806f0, 0, (1 << 26) | (1 << 28), 0), // xsave, avx
  entry(7, 0, 0, 0, 1 << 3, 0), // pku
  entry(0xd, 0, 0x207, 576, 576, 0),
  entry(0xd, 1, 0b1011, 0, 0, 0), // xsaveopt, xsavec, xsaves
  entry(0xd, 2, 256, 576, 0, 0),
  entry(0xd, 9, 8, 2688, 0, 0),
];
const leaf = (t: CpuidEntry[], i: number) => t.find((e) => e.function === 0xd && e.index === i);

test("leaf 0xD: the sizes are those of the XCR0 offered, standard and compacted", () => {
  const t = vcpuCpuid(supported, { apicId: 0, vcpuCount: 1, hidden: [] });
  assert.equal(allowedXcr0(t), 0x207n);
  // Standard format: PKRU ends the area at 2688 + 8 (what Linux computes from the sub-leaves).
  assert.equal(leaf(t, 0)!.ebx, 2696);
  assert.equal(leaf(t, 0)!.ecx, 2696);
  // Compacted (XSAVEC): 576 + 256 (AVX) + 8 (PKRU), no alignment asked for.
  assert.equal(leaf(t, 1)!.ebx, 576 + 256 + 8);
  assert.equal(xsaveAreaSize(0x3n, t, false), 576);
});

test("leaf 0xD: hiding AVX or PKU takes their state out of XCR0, the sizes and the sub-leaves", () => {
  const noAvx = vcpuCpuid(supported, { apicId: 0, vcpuCount: 1, hidden: resolveHiddenFeatures(["avx"]) });
  assert.equal(allowedXcr0(noAvx), 0x203n);
  assert.equal(leaf(noAvx, 2), undefined);
  assert.equal(leaf(noAvx, 0)!.ebx, 2696);
  assert.equal(leaf(noAvx, 1)!.ebx, 576 + 8);
  const noPku = vcpuCpuid(supported, { apicId: 0, vcpuCount: 1, hidden: resolveHiddenFeatures(["pku"]) });
  assert.equal(allowedXcr0(noPku), 0x7n);
  assert.equal(leaf(noPku, 9), undefined);
  assert.deepEqual([leaf(noPku, 0)!.ebx, leaf(noPku, 0)!.ecx, leaf(noPku, 1)!.ebx], [832, 832, 832]);
  // XSAVE hidden: no leaf 0xD at all, nothing for XCR0.
  const none = vcpuCpuid(supported, { apicId: 0, vcpuCount: 1, hidden: resolveHiddenFeatures(["xsave"]) });
  assert.equal(none.some((e) => e.function === 0xd), false);
  assert.equal(allowedXcr0(none), 0n);
});

test("leaf 0xD: a component KVM gave no sub-leaf for is not offered; 64-byte alignment in the compacted form", () => {
  const t = vcpuCpuid(
    [entry(0xd, 0, 0xe7, 0, 0, 0), entry(0xd, 1, 0b10, 0, 0, 0), entry(0xd, 2, 256, 576, 0, 0), entry(0xd, 5, 64, 1088, 2, 0), entry(0xd, 6, 512, 1152, 2, 0)],
    { apicId: 0, vcpuCount: 1, hidden: [] },
  );
  assert.equal(allowedXcr0(t), 0x67n, "bit 7 (Hi16_ZMM) has no sub-leaf");
  assert.equal(leaf(t, 0)!.ebx, 1152 + 512);
  // Compacted: 576 + 256 = 832 -> aligned 832 (+64) = 896 -> aligned 896 (+512) = 1408.
  assert.equal(leaf(t, 1)!.ebx, 1408);
});
