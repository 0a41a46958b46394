/**
 * The MSI-X table and pending-bit array (BAR 1), as the guest sees them.
 *
 * The table is memory-like: any byte can be read, and writes merge into the entry's dwords
 * (drivers use 32-bit accesses; a 64-bit one covers two dwords). Only bit 0 of the vector
 * control dword (the mask) exists. The PBA is read-only. Unmasking a vector with a pending
 * bit releases the message that was held (see VirtioPciRegs.signalLocked), through the
 * `msixUnmasked` effect. Runs under the regs lock.
 */
import { MSIX_ENTRY_MASKED, MSIX_ENTRY_SIZE, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET } from "./transport-layout";
import { MSIX_VECTOR_CONTROL, type VirtioPciRegs } from "./transport-state";
import type { RegisterContext } from "./transport-registers";

export function msixRead(regs: VirtioPciRegs, offset: number, data: Uint8Array): void {
  const tableEnd = MSIX_TABLE_OFFSET + regs.tableSize * MSIX_ENTRY_SIZE;
  const pbaEnd = MSIX_PBA_OFFSET + 8 * Math.ceil(regs.tableSize / 64);
  for (let i = 0; i < data.length; i++) {
    const o = offset + i;
    let word = 0;
    if (o >= MSIX_TABLE_OFFSET && o < tableEnd) {
      const rel = o - MSIX_TABLE_OFFSET;
      word = regs.entry(rel >> 4, (rel >> 2) & 3);
    } else if (o >= MSIX_PBA_OFFSET && o < pbaEnd) {
      word = regs.pbaWord((o - MSIX_PBA_OFFSET) >> 2);
    }
    data[i] = (word >>> (8 * (o & 3))) & 0xff;
  }
}

export function msixWrite(ctx: RegisterContext, offset: number, data: Uint8Array): void {
  const { regs } = ctx;
  const tableEnd = MSIX_TABLE_OFFSET + regs.tableSize * MSIX_ENTRY_SIZE;
  let touched = false;
  for (let i = 0; i < data.length; i++) {
    const o = offset + i;
    if (o < MSIX_TABLE_OFFSET || o >= tableEnd) continue; // the PBA and the gap are read-only
    const rel = o - MSIX_TABLE_OFFSET;
    const vector = rel >> 4;
    const dword = (rel >> 2) & 3;
    const shift = 8 * (o & 3);
    let value = (regs.entry(vector, dword) & ~(0xff << shift)) | (data[i]! << shift);
    if (dword === MSIX_VECTOR_CONTROL) value &= MSIX_ENTRY_MASKED;
    regs.setEntry(vector, dword, value);
    touched = true;
  }
  if (!touched) return;
  releasePending(ctx);
  ctx.later({ kind: "msixChanged" });
}

/** Send what was held for vectors that can now be delivered (after an unmask or enable). */
export function releasePending(ctx: RegisterContext): void {
  for (const { vector, message } of ctx.regs.takeDeliverableLocked()) {
    ctx.later({ kind: "msixUnmasked", vector, message });
  }
}
