/**
 * The CPUID instruction, as this process (and so this host's kernel) sees it: to tell
 * whether the host itself runs in a VM, and under which hypervisor (leaf 0x40000000),
 * which decides what kind of KVM /dev/kvm is (src/kvm/host.ts). JavaScript has no CPUID,
 * so this writes a 27-byte function into an executable page once and calls it via koffi.
 */
import koffi from "koffi";
import { MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE, mmap, munmap, view } from "./libc";

export interface CpuidRegs {
  eax: number;
  ebx: number;
  ecx: number;
  edx: number;
}

const PROT_EXEC = 4;

/** void cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4]) (System V AMD64 ABI). */
const CPUID_FN = [
  0x53, //                 push rbx            (callee-saved; CPUID writes it)
  0x89, 0xf8, //           mov  eax, edi       leaf
  0x89, 0xf1, //           mov  ecx, esi       subleaf
  0x49, 0x89, 0xd0, //     mov  r8, rdx        out
  0x0f, 0xa2, //           cpuid
  0x41, 0x89, 0x00, //     mov  [r8], eax
  0x41, 0x89, 0x58, 0x04, // mov [r8+4], ebx
  0x41, 0x89, 0x48, 0x08, // mov [r8+8], ecx
  0x41, 0x89, 0x50, 0x0c, // mov [r8+12], edx
  0x5b, //                 pop  rbx
  0xc3, //                 ret
];

let fn: ((leaf: number, subleaf: number) => CpuidRegs) | null | undefined;

function bind(): ((leaf: number, subleaf: number) => CpuidRegs) | null {
  if (process.arch !== "x64") return null;
  try {
    const page = mmap(4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
    new Uint8Array(view(page, 4096)).set(CPUID_FN);
    const mprotect = koffi.load("libc.so.6").func("mprotect", "int", ["void *", "size_t", "int"]);
    if ((mprotect(page, 4096, PROT_READ | PROT_EXEC) as number) !== 0) {
      munmap(page, 4096);
      return null; // W^X policy (SELinux execmem, ...): callers fall back to /proc/cpuinfo
    }
    const proto = koffi.proto("void tskvm_cpuid(uint32_t leaf, uint32_t subleaf, _Out_ uint32_t *out)");
    const out = new Uint32Array(4);
    return (leaf, subleaf) => {
      koffi.call(page as unknown as any, proto, leaf >>> 0, subleaf >>> 0, out);
      return { eax: out[0]!, ebx: out[1]!, ecx: out[2]!, edx: out[3]! };
    };
  } catch {
    return null;
  }
}

/** CPUID leaf/subleaf on this CPU, or undefined where it cannot be executed. */
export function hostCpuid(leaf: number, subleaf = 0): CpuidRegs | undefined {
  if (fn === undefined) fn = bind();
  return fn === null ? undefined : fn(leaf, subleaf);
}
