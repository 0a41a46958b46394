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
