/**
 * Decoding the kvm_run page (kvm/vcpu-exit.ts) over a fake page: each exit kind, and that
 * the decoder hands out the same objects every time (nothing allocated per exit).
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { VcpuExitDecoder } from "../../src/kvm/vcpu-exit";
import { ExitReason, KvmRun, SystemEvent } from "../../src/kvm/abi";
import { Errno } from "../../src/sys/errors";

function page(): { bytes: Uint8Array; dv: DataView } {
  const bytes = new Uint8Array(2 * 4096);
  return { bytes, dv: new DataView(bytes.buffer) };
}

describe("VcpuExitDecoder", () => {
  it("decodes a PIO OUT and hands out the same exit object and data windows each time", () => {
    const { bytes, dv } = page();
    const dec = new VcpuExitDecoder(bytes);
    dv.setUint32(KvmRun.exit_reason, ExitReason.IO, true);
    dv.setUint8(KvmRun.io.direction, 1);
    dv.setUint8(KvmRun.io.size, 2);
    dv.setUint16(KvmRun.io.port, 0x3f8, true);
    dv.setUint32(KvmRun.io.count, 3, true);
    dv.setUint32(KvmRun.io.data_offset, 4096, true);
    bytes.set([1, 2, 3, 4, 5, 6], 4096);
    const e = dec.decode(0);
    assert.equal(e.kind, "pio");
    if (e.kind !== "pio") return;
    assert.deepEqual([e.port, e.size, e.count, e.isWrite], [0x3f8, 2, 3, true]);
    assert.deepEqual([...e.data(0)], [1, 2]);
    assert.deepEqual([...e.data(2)], [5, 6]);
    assert.equal(dec.decode(0), e, "one object per kind");
    assert.equal(e.data(2), e.data(2), "windows are cached");
    dv.setUint32(KvmRun.io.data_offset, 16, true);
    assert.throws(() => dec.decode(0).kind === "pio" && e.data(0), /outside kvm_run/);
  });

  it("decodes MMIO with its length, system events, entry failures and internal errors", () => {
    const { bytes, dv } = page();
    const dec = new VcpuExitDecoder(bytes);
    dv.setUint32(KvmRun.exit_reason, ExitReason.MMIO, true);
    dv.setUint32(KvmRun.mmio.phys_addr, 0xfeb0_1000, true);
    dv.setUint32(KvmRun.mmio.phys_addr + 4, 1, true);
    dv.setUint32(KvmRun.mmio.len, 4, true);
    dv.setUint8(KvmRun.mmio.is_write, 0);
    const m = dec.decode(0);
    assert.ok(m.kind === "mmio");
    assert.equal(m.address, 0x1_feb0_1000);
    assert.equal(m.isWrite, false);
    assert.equal(m.data.length, 4);
    m.data.set([9, 8, 7, 6]);
    assert.deepEqual([...bytes.subarray(KvmRun.mmio.data, KvmRun.mmio.data + 4)], [9, 8, 7, 6], "a read fills kvm_run");

    dv.setUint32(KvmRun.exit_reason, ExitReason.SYSTEM_EVENT, true);
    dv.setUint32(KvmRun.system_event.type, SystemEvent.RESET, true);
    assert.deepEqual(dec.decode(0), { kind: "system-event", type: SystemEvent.RESET });

    dv.setUint32(KvmRun.exit_reason, ExitReason.FAIL_ENTRY, true);
    dv.setBigUint64(KvmRun.fail_entry.hardware_entry_failure_reason, 0x80000021n, true);
    assert.deepEqual(dec.decode(0), { kind: "fail-entry", hardwareReason: 0x80000021n });

    dv.setUint32(KvmRun.exit_reason, ExitReason.INTERNAL_ERROR, true);
    dv.setUint32(KvmRun.internal.suberror, 1, true);
    dv.setUint32(KvmRun.internal.ndata, 2, true);
    dv.setBigUint64(KvmRun.internal.data, 0xaan, true);
    dv.setBigUint64(KvmRun.internal.data + 8, 0xbbn, true);
    assert.deepEqual(dec.decode(0), { kind: "internal-error", suberror: 1, data: [0xaan, 0xbbn] });

    dv.setUint32(KvmRun.exit_reason, 999, true);
    assert.deepEqual(dec.decode(0), { kind: "unknown", reason: 999 });
    for (const [reason, kind] of [[ExitReason.HLT, "hlt"], [ExitReason.SHUTDOWN, "shutdown"], [ExitReason.INTR, "intr"]] as const) {
      dv.setUint32(KvmRun.exit_reason, reason, true);
      assert.equal(dec.decode(0).kind, kind);
    }
  });

  it("tells a kick (EINTR, EAGAIN) from a failed KVM_RUN", () => {
    const dec = new VcpuExitDecoder(page().bytes);
    assert.equal(dec.decode(-Errno.EINTR).kind, "interrupted");
    assert.equal(dec.decode(-Errno.EAGAIN).kind, "interrupted");
    assert.deepEqual(dec.decode(-Errno.EINVAL), { kind: "run-failed", errno: Errno.EINVAL });
  });
});
