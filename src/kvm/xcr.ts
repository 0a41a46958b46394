/**
 * XCR0 (the XSAVE feature mask) of a vCPU, set from the host before the guest starts.
 *
 * Why: KVM reports the XSAVE area size in CPUID 0xD (EBX) for the XCR0 it believes the
 * guest has, and loads that XCR0 on every VM entry. A guest's XSETBV normally traps to KVM,
 * which keeps both right; under a nested hypervisor that does not pass the trap on (QEMU's
 * emulated SVM: measured, a stock Linux then warns "XSAVE consistency problem: size 2696 !=
 * kernel_size 576"), KVM keeps XCR0 = x87 and the two disagree. Starting the vCPU with the
 * XCR0 its CPUID offers (cpuid.ts allowedXcr0, which is what Linux enables) makes them agree
 * there, and changes nothing where XSETBV traps: the guest writes the same value itself.
 */
import * as sys from "../sys/libc";
import { iow } from "../sys/ioctl-number";
import type { Vcpu } from "./vcpu";

/** struct kvm_xcrs: nr_xcrs, flags, 16 x { u32 xcr, u32 reserved, u64 value }, u64 padding[16]. */
const KVM_XCRS_SIZE = 392;
const KVM_SET_XCRS = iow(0xae, 0xa7, KVM_XCRS_SIZE);

export function setXcr0(vcpu: Vcpu, value: bigint): void {
  const buf = new Uint8Array(KVM_XCRS_SIZE);
  const dv = new DataView(buf.buffer);
  dv.setUint32(0, 1, true); // nr_xcrs
  dv.setUint32(8, 0, true); // xcrs[0].xcr = XCR0
  dv.setBigUint64(16, value, true); // xcrs[0].value
  sys.ioctl(vcpu.fd, KVM_SET_XCRS, buf, "KVM_SET_XCRS");
}
