import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { readlinkSync } from "node:fs";
import * as sys from "../../src/sys/libc";
import { ftruncate } from "../../src/sys/memfd";
import { GuestMemory } from "../../src/memory/guest-memory";
import { ramLayout } from "../../src/arch/x86/layout";

const GiB = 1024 * 1024 * 1024;

describe("guest RAM from a memfd (for vhost-user back ends)", () => {
  it("keeps the layout around the PCI hole and describes it in two stretches of one file", () => {
    const mem = GuestMemory.allocate(ramLayout(8 * GiB), { shared: true });
    try {
      assert.deepEqual(mem.regions.map((r) => [r.base / GiB, r.size / GiB]), [[0, 3], [4, 4], [8, 1]], "4 GiB views, PCI hole at 3-4 GiB");
      const shared = mem.shared!;
      assert.match(readlinkSync(`/proc/self/fd/${shared.fd}`), /memfd:tskvm-guest-ram/);
      assert.deepEqual(
        shared.stretches.map((s) => [s.guestAddress / GiB, s.size / GiB, s.fileOffset / GiB]),
        [[0, 3, 0], [4, 5, 3]],
      );
      assert.equal(shared.stretches[1]!.hostAddress, mem.regions[1]!.hostAddress);
      // The same bytes through guest RAM and through the file another process would map.
      mem.write(5 * GiB + 123, Uint8Array.from([1, 2, 3]));
      const back = new Uint8Array(3);
      sys.pread(shared.fd, back, 4 * GiB + 123);
      assert.deepEqual([...back], [1, 2, 3]);
      sys.pwrite(shared.fd, Uint8Array.from([9]), 0x1000);
      assert.equal(mem.readU8(0x1000), 9);
      // Sealed: a back end cannot shrink guest RAM under us (SIGBUS) nor grow it.
      assert.throws(() => ftruncate(shared.fd, GiB), /EPERM/);
      assert.throws(() => ftruncate(shared.fd, 9 * GiB), /EPERM/);
    } finally {
      const fd = mem.shared!.fd;
      mem.free();
      assert.equal(mem.shared, undefined);
      assert.throws(() => readlinkSync(`/proc/self/fd/${fd}`), "the memfd is closed with the memory");
    }
  });

  it("stays anonymous and private by default", () => {
    const mem = GuestMemory.allocate(16 * 1024 * 1024);
    assert.equal(mem.shared, undefined);
    mem.free();
  });
});
