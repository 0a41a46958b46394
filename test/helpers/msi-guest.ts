/**
 * A 64-bit tiny guest that takes interrupts: it enables its local APIC, loads an IDT whose
 * vector MSI_VECTOR handler counts into a u32 at COUNTER_ADDRESS and sends the EOI, and then
 * halts with interrupts on, forever. Hand-assembled like guest-code.ts; load it at LOAD_ADDRESS
 * in long mode (the boot page tables identity-map 0-4 GiB, so the xAPIC page is reachable).
 */
export const LOAD_ADDRESS = 0x100000;
export const MSI_VECTOR = 0x40;
const IDT_ADDRESS = LOAD_ADDRESS + 0x1000;
export const COUNTER_ADDRESS = LOAD_ADDRESS + 0x2000;
const STACK_TOP = LOAD_ADDRESS + 0x10000;
const CODE64_SELECTOR = 0x08;

/** The MSI message that reaches APIC 0 with MSI_VECTOR (fixed delivery, edge). */
export const MSI_TO_CPU0 = { address: 0xfee0_0000n, data: MSI_VECTOR };

const le32 = (v: number): number[] => [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];

export function msiCountingGuest(): Uint8Array {
  const code: number[] = [
    0x48, 0xbc, ...le32(STACK_TOP), 0, 0, 0, 0, // mov rsp, STACK_TOP
    0xb8, ...le32(0xfee000f0), //                 mov eax, 0xfee000f0   (spurious-vector register)
    0xc7, 0x00, ...le32(0x1ff), //                mov dword [rax], 0x1ff (APIC on, spurious vector 0xff)
    0x0f, 0x01, 0x1c, 0x25, 0, 0, 0, 0, //        lidt [idtr]           (absolute, patched below)
    0xfb, //                                      sti
    0xf4, //                                loop: hlt
    0xeb, 0xfd, //                                jmp loop
  ];
  const handler = LOAD_ADDRESS + code.length;
  code.push(
    0xb8, ...le32(COUNTER_ADDRESS), //            mov eax, COUNTER
    0xf0, 0xff, 0x00, //                          lock inc dword [rax]
    0xb8, ...le32(0xfee000b0), //                 mov eax, 0xfee000b0   (EOI register)
    0xc7, 0x00, ...le32(0), //                    mov dword [rax], 0
    0x48, 0xcf, //                                iretq
  );
  const spurious = LOAD_ADDRESS + code.length;
  code.push(0x48, 0xcf); //                       iretq (no EOI for the spurious vector)
  const idtr = LOAD_ADDRESS + code.length;
  code.push(...[0xff, 0x0f], ...le32(IDT_ADDRESS), 0, 0, 0, 0); // limit 256*16-1, base
  const lidt = code.indexOf(0x1c) + 2;
  code.splice(lidt, 4, ...le32(idtr));

  const image = new Uint8Array(COUNTER_ADDRESS + 4 - LOAD_ADDRESS);
  image.set(code, 0);
  const gate = (vector: number, target: number): void => {
    const o = IDT_ADDRESS - LOAD_ADDRESS + 16 * vector;
    image.set([target & 0xff, (target >> 8) & 0xff, CODE64_SELECTOR, 0, 0, 0x8e, (target >> 16) & 0xff, (target >>> 24) & 0xff], o);
  };
  gate(MSI_VECTOR, handler);
  gate(0xff, spurious);
  return image;
}
