/**
 * Tiny guest programs for the KVM tests, hand-assembled: each instruction's bytes sit next
 * to its assembly so a reader can check them against the Intel SDM.
 */

export const COM1 = 0x3f8;

/** Real mode (16-bit), loaded at `base`: print `text` on COM1, then reset through the i8042. */
export function realModeHello(base: number, text: string): Uint8Array {
  const code = [
    0xba, COM1 & 0xff, COM1 >> 8, //    mov dx, 0x3f8
    0xbe, 0, 0, //                      mov si, msg        (patched below; DS = 0)
    0xac, //                      next: lodsb
    0x84, 0xc0, //                      test al, al
    0x74, 0x03, //                      jz done
    0xee, //                            out dx, al
    0xeb, 0xf8, //                      jmp next
    0xb0, 0xfe, //                done: mov al, 0xfe       (i8042: pulse reset line)
    0xe6, 0x64, //                      out 0x64, al
    0xf4, //                            hlt
  ];
  const msg = base + code.length;
  code[4] = msg & 0xff;
  code[5] = (msg >> 8) & 0xff;
  return Uint8Array.from([...code, ...Buffer.from(text, "latin1"), 0]);
}

/** 64-bit long mode: print `text` on COM1, then reset through the i8042. */
export function longModeHello(text: string): Uint8Array {
  const code = [
    0x66, 0xba, COM1 & 0xff, COM1 >> 8, // mov dx, 0x3f8
    0x48, 0x8d, 0x35, 0, 0, 0, 0, //       lea rsi, [rip + msg] (patched below)
    0xac, //                         next: lodsb
    0x84, 0xc0, //                         test al, al
    0x74, 0x03, //                         jz done
    0xee, //                               out dx, al
    0xeb, 0xf8, //                         jmp next
    0xb0, 0xfe, //                   done: mov al, 0xfe
    0xe6, 0x64, //                         out 0x64, al
    0xf4, //                               hlt
  ];
  // rip-relative: from the end of the lea (offset 11) to the message after the code.
  code[7] = code.length - 11;
  return Uint8Array.from([...code, ...Buffer.from(text, "latin1"), 0]);
}

/**
 * 64-bit: read 32 bits from an unbacked MMIO address and from an unclaimed port, write both
 * low bytes to COM1, write to the MMIO address, then reset.
 */
export function longModeUnbacked(mmioAddress: number, port: number): Uint8Array {
  const a = mmioAddress;
  return Uint8Array.from([
    0x48, 0xbb, a & 0xff, (a >> 8) & 0xff, (a >> 16) & 0xff, (a >>> 24) & 0xff, 0, 0, 0, 0, // mov rbx, addr
    0x8b, 0x03, //                         mov eax, [rbx]
    0x66, 0xba, COM1 & 0xff, COM1 >> 8, // mov dx, 0x3f8
    0xee, //                               out dx, al
    0xe4, port & 0xff, //                  in al, port
    0xee, //                               out dx, al
    0x89, 0x03, //                         mov [rbx], eax
    0xb0, 0xfe, //                         mov al, 0xfe
    0xe6, 0x64, //                         out 0x64, al
    0xf4, //                               hlt
  ]);
}

/** `hlt` with interrupts off. */
export const HALT = Uint8Array.from([0xfa /* cli */, 0xf4 /* hlt */]);

/** Spin forever without exits: only a stop request can end it. */
export const SPIN = Uint8Array.from([0xeb, 0xfe /* jmp $ */]);

/** 64-bit: `ud2` with an empty IDT: #UD, then #DF, then a triple fault. */
export const TRIPLE_FAULT = Uint8Array.from([0x0f, 0x0b]);

/** Real mode loop of port writes for the PIO benchmark: the same bytes native/pio_exit_bench.c runs. */
export function pioLoop(port: number): Uint8Array {
  return Uint8Array.from([
    0xba, port & 0xff, port >> 8, // mov dx, port
    0xee, //                   l: out dx, al
    0xeb, 0xfd, //                jmp l
  ]);
}

/** Where smpStart's application processors begin (SIPI vector 0x08). */
export const AP_TRAMPOLINE = 0x8000;

/**
 * SMP start-up, the way a BIOS or kernel does it. The BSP (64-bit) enables its LAPIC,
 * broadcasts INIT then SIPI twice (vector 0x08: APs start in real mode at 0x8000), then
 * prints its own APIC id as an ASCII digit on COM1 and halts. Each AP switches to 32-bit
 * protected mode with the boot GDT (selectors 0x10 code, 0x18 data), reads its APIC id from
 * its LAPIC and prints it the same way.
 */
export function smpStart(): { bsp: Uint8Array; trampoline: Uint8Array } {
  const lapicIdThenPrint32 = [
    0xc1, 0xe8, 0x18, //                   shr eax, 24
    0x04, 0x30, //                         add al, '0'
    0x66, 0xba, COM1 & 0xff, COM1 >> 8, // mov dx, 0x3f8
    0xee, //                               out dx, al
    0xf4, //                            l: hlt
    0xeb, 0xfd, //                         jmp l
  ];
  const bsp = Uint8Array.from([
    0x48, 0xbb, 0x00, 0x03, 0xe0, 0xfe, 0, 0, 0, 0, // mov rbx, 0xfee00300 (ICR low)
    0xc7, 0x83, 0xf0, 0xfd, 0xff, 0xff, 0xff, 0x01, 0, 0, // mov dword [rbx-0x210], 0x1ff (SVR: enable)
    0xc7, 0x43, 0x10, 0, 0, 0, 0, //        mov dword [rbx+0x10], 0  (ICR high)
    0xc7, 0x03, 0x00, 0x45, 0x0c, 0x00, //  mov dword [rbx], 0x000c4500 (INIT, all but self)
    0xc7, 0x03, 0x08, 0x46, 0x0c, 0x00, //  mov dword [rbx], 0x000c4608 (SIPI, vector 8)
    0xc7, 0x03, 0x08, 0x46, 0x0c, 0x00, //  mov dword [rbx], 0x000c4608 (SIPI again)
    0x8b, 0x83, 0x20, 0xfd, 0xff, 0xff, //  mov eax, [rbx-0x2e0] (LAPIC ID, 0xfee00020)
    ...lapicIdThenPrint32,
  ]);
  const gdtr = 0x40; // offset inside the trampoline page
  const code32 = 0x20;
  const t = new Uint8Array(0x48);
  t.set([
    0xfa, //                               cli
    0x0f, 0x01, 0x16, (AP_TRAMPOLINE + gdtr) & 0xff, (AP_TRAMPOLINE + gdtr) >> 8, // lgdt [gdtr] (DS = 0)
    0x0f, 0x20, 0xc0, //                   mov eax, cr0
    0x0c, 0x01, //                         or al, 1 (PE)
    0x0f, 0x22, 0xc0, //                   mov cr0, eax
    0x66, 0xea, (AP_TRAMPOLINE + code32) & 0xff, (AP_TRAMPOLINE + code32) >> 8, 0, 0, 0x10, 0x00, // jmp dword 0x10:code32
  ]);
  t.set([
    0x66, 0xb8, 0x18, 0x00, //             mov ax, 0x18
    0x8e, 0xd8, //                         mov ds, ax
    0xa1, 0x20, 0x00, 0xe0, 0xfe, //       mov eax, [0xfee00020] (LAPIC ID)
    ...lapicIdThenPrint32,
  ], code32);
  t.set([0x1f, 0x00, 0x00, 0x05, 0x00, 0x00], gdtr); // limit 0x1f, base 0x500 (the boot GDT)
  return { bsp, trampoline: t };
}

/** 64-bit: echo bytes received on COM1 back to it (polling LSR) until a 'q', then reset. */
export const ECHO_UNTIL_Q = Uint8Array.from([
  0x66, 0xba, 0xfd, 0x03, //  0: mov dx, 0x3fd (LSR)
  0xec, //                    4: in al, dx
  0xa8, 0x01, //              5: test al, 1 (DR: data ready)
  0x74, 0xfb, //              7: jz 4
  0x66, 0xba, 0xf8, 0x03, //  9: mov dx, 0x3f8
  0xec, //                   13: in al, dx (RBR)
  0x3c, 0x71, //             14: cmp al, 'q'
  0x74, 0x05, //             16: je 23
  0xee, //                   18: out dx, al
  0xeb, 0xeb, //             19: jmp 0
  0x90, 0x90, //             21: nop; nop
  0xb0, 0xfe, //             23: mov al, 0xfe
  0xe6, 0x64, //             25: out 0x64, al (i8042 reset)
  0xf4, //                   27: hlt
]);

/** Where counterLoop keeps its memory counter, and the port it reports on. */
export const COUNTER_ADDRESS = 0x200000;
export const COUNTER_PORT = 0x5e0;

/**
 * 64-bit: count in RBX and in the qword at COUNTER_ADDRESS, and exit to user space on
 * COUNTER_PORT after each step, forever. Both counters say how far the guest has run.
 */
export function counterLoop(): Uint8Array {
  const a = COUNTER_ADDRESS;
  return Uint8Array.from([
    0x48, 0xff, 0xc3, //                            0: inc rbx
    0x48, 0xff, 0x04, 0x25, a & 0xff, (a >> 8) & 0xff, (a >> 16) & 0xff, (a >>> 24) & 0xff, // 3: inc qword [a]
    0x66, 0xba, COUNTER_PORT & 0xff, COUNTER_PORT >> 8, // 11: mov dx, port
    0xee, //                                       15: out dx, al
    0xeb, 0xee, //                                 16: jmp 0
  ]);
}

/**
 * 64-bit: count in the qword at COUNTER_ADDRESS and in COM1's scratch register (a device
 * register), and print the scratch register's value on COM1 after each step: the console
 * reads 1, 2, 3, ... (mod 256), forever. Memory, device state and console output say how
 * far the guest has run.
 */
export function counterWithDevice(): Uint8Array {
  const a = COUNTER_ADDRESS;
  const scr = COM1 + 7;
  return Uint8Array.from([
    0x48, 0xff, 0x04, 0x25, a & 0xff, (a >> 8) & 0xff, (a >> 16) & 0xff, (a >>> 24) & 0xff, // 0: inc qword [a]
    0x66, 0xba, scr & 0xff, scr >> 8, //            8: mov dx, COM1 + 7 (SCR)
    0xec, //                                       12: in al, dx
    0xfe, 0xc0, //                                 13: inc al
    0xee, //                                       15: out dx, al
    0x66, 0xba, COM1 & 0xff, COM1 >> 8, //         16: mov dx, COM1 (THR)
    0xee, //                                       20: out dx, al
    0xeb, 0xe9, //                                 21: jmp 0
  ]);
}

/** The pvpanic port (QEMU's ISA pvpanic, tskvm's src/devices/legacy/pvpanic.ts). */
export const PVPANIC = 0x505;

/**
 * 64-bit: read the pvpanic port and print what it offers as a digit on COM1 ("3": PANICKED
 * and CRASH_LOADED), write PANICKED to it, then spin: only the panic can end the VM.
 */
export function pvpanicThenSpin(): Uint8Array {
  return Uint8Array.from([
    0x66, 0xba, PVPANIC & 0xff, PVPANIC >> 8, // mov dx, 0x505
    0xec, //                                     in al, dx
    0x04, 0x30, //                               add al, '0'
    0x66, 0xba, COM1 & 0xff, COM1 >> 8, //       mov dx, 0x3f8
    0xee, //                                     out dx, al
    0xb0, 0x01, //                               mov al, 1        (PVPANIC_PANICKED)
    0x66, 0xba, PVPANIC & 0xff, PVPANIC >> 8, // mov dx, 0x505
    0xee, //                                     out dx, al
    0xeb, 0xfe, //                               jmp $
  ]);
}

/** 64-bit: write "x" to COM1 forever, as fast as the UART takes it (a guest flooding its console). */
export const SERIAL_FLOOD = Uint8Array.from([
  0x66, 0xba, COM1 & 0xff, COM1 >> 8, // mov dx, 0x3f8
  0xb0, 0x78, //                         mov al, 'x'
  0xee, //                         loop: out dx, al
  0xeb, 0xfd, //                         jmp loop
]);
