/**
 * src/vcpu/exit-stats.ts: counting, merging the counts of several vCPUs, and the summary.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { ExitStats, MMIO_OTHER, formatExitSummary, mergeExitStats } from "../../src/vcpu/exit-stats";

describe("ExitStats", () => {
  it("counts exits by reason, port and MMIO address, as plain data", () => {
    const s = new ExitStats();
    s.exit(2);
    s.exit(2);
    s.exit(6);
    s.exit(500);
    s.pio(0x3fd, false);
    s.pio(0x3f8, true, 3);
    s.pio(0x3fd, false);
    s.mmioAccess(0xfe000000, true);
    assert.deepEqual(s.data(), {
      reasons: [[2, 2], [6, 1], [127, 1]],
      pio: [[0x3f8, 0, 3], [0x3fd, 2, 0]],
      mmio: [[0xfe000000, 0, 1]],
    });
    assert.deepEqual(JSON.parse(JSON.stringify(s.data())), s.data());
  });

  it("counts a guest that touches endless MMIO addresses in one overflow entry", () => {
    const s = new ExitStats();
    for (let a = 0; a < 10000; a++) s.mmioAccess(0x1000 * a, false);
    const d = s.data();
    assert.equal(d.mmio.length, 4097);
    assert.deepEqual(d.mmio.find(([a]) => a === MMIO_OTHER), [MMIO_OTHER, 10000 - 4096, 0]);
  });

  it("adds up several vCPUs and prints the busiest first", () => {
    const a = new ExitStats();
    const b = new ExitStats();
    a.exit(2);
    b.exit(2);
    b.exit(6);
    a.pio(0x3fd, false, 5);
    b.pio(0x3fd, false, 5);
    b.pio(0x3f8, true, 2);
    b.mmioAccess(0xd0000000, false);
    const m = mergeExitStats([a.data(), b.data()]);
    assert.deepEqual(m.reasons, [[2, 2], [6, 1]]);
    assert.deepEqual(m.pio, [[0x3f8, 0, 2], [0x3fd, 10, 0]]);
    const text = formatExitSummary(m, {
      reasonName: (r) => (r === 2 ? "IO" : r === 6 ? "MMIO" : String(r)),
      portName: (p) => (p === 0x3fd ? "COM1 LSR" : undefined),
    });
    assert.equal(
      text,
      [
        "exits to tskvm: 3 (IO 2, MMIO 1)",
        "  port 0x03fd COM1 LSR: 10 (10 in, 0 out)",
        "  port 0x03f8: 2 (0 in, 2 out)",
        "  mmio 0xd0000000: 1 (1 reads, 0 writes)",
      ].join("\n"),
    );
  });
});
