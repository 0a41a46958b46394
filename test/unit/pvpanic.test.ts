/**
 * The panic signals a guest can give: the pvpanic port, and "Kernel panic - not syncing" on
 * its console (matched across writes of any size).
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { PvPanic, PVPANIC_CRASH_LOADED, PVPANIC_PANICKED } from "../../src/devices/legacy/pvpanic";
import { panicWatch } from "../../src/board/devices";
import type { VmControl } from "../../src/devices/device";

class Control implements VmControl {
  readonly panics: [string, boolean][] = [];
  requestReset(): void {
    assert.fail("pvpanic resets nothing");
  }
  guestPanicked(reason: string, now: boolean): void {
    this.panics.push([reason, now]);
  }
}

describe("pvpanic", () => {
  it("offers PANICKED and CRASH_LOADED; a write of PANICKED ends the VM at once, CRASH_LOADED does not", () => {
    const c = new Control();
    const dev = new PvPanic(c);
    const d = Uint8Array.of(0xaa);
    dev.read(0, d);
    assert.equal(d[0], PVPANIC_PANICKED | PVPANIC_CRASH_LOADED);
    dev.write(0, Uint8Array.of(PVPANIC_CRASH_LOADED));
    dev.write(0, Uint8Array.of(0));
    assert.deepEqual(c.panics, []);
    dev.write(0, Uint8Array.of(PVPANIC_PANICKED | PVPANIC_CRASH_LOADED));
    assert.deepEqual(c.panics, [["guest kernel panicked (it said so through pvpanic)", true]]);
  });
});

describe("the console's panic line", () => {
  const watch = () => {
    const out: number[] = [];
    let panics = 0;
    const sink = panicWatch({ write: (b) => out.push(...b) }, () => panics++);
    return { sink, out, panics: () => panics };
  };

  it("passes every byte through and sees the line however it is split", () => {
    const text = Buffer.from("[    1.0] KKernel panic - not syncing: Attempted to kill init!\r\n", "latin1");
    for (const chunk of [1, 2, 7, text.length]) {
      const w = watch();
      for (let i = 0; i < text.length; i += chunk) w.sink.write(text.subarray(i, i + chunk));
      assert.deepEqual(Buffer.from(w.out), text);
      assert.equal(w.panics(), 1, `in chunks of ${chunk}`);
    }
  });

  it("does not fire on near misses", () => {
    const w = watch();
    w.sink.write(Buffer.from("Kernel panic - not syncin\nKernel  panic - not syncing\nkernel panic - not syncing\n", "latin1"));
    assert.equal(w.panics(), 0);
  });
});
