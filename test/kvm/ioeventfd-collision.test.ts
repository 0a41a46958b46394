/**
 * KVM's own answer to a guest that moves one virtio function's notify BAR onto another's:
 * the second registration is refused (EEXIST), and the board's moveIoeventfds undoes what
 * that move had registered, so the function falls back to exits and KVM holds nothing that
 * the transport's record does not cover. (test/unit/hostile-guest.test.ts has the same
 * with a model of KVM's table; this checks the model against KVM.)
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { Kvm } from "../../src/kvm/kvm";
import * as sys from "../../src/sys/libc";
import { moveIoeventfds } from "../../src/board/devices";
import type { NotifyAddress } from "../../src/devices/virtio/transport-state";
import { kvmSkip } from "../helpers/tiers";

const noKvm = kvmSkip();

function addresses(modern: number, legacy: number): NotifyAddress[] {
  return [0, 1].flatMap((q) => [
    { index: q, address: modern + 0x3000 + 4 * q, pio: false, length: 2 },
    { index: q, address: legacy + 0x10, pio: true, length: 2, datamatch: q },
  ]);
}

test("a notify address another function holds: EEXIST, this move undone, the other function untouched", { skip: noKvm }, () => {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const a = [sys.eventfd(), sys.eventfd()];
  const b = [sys.eventfd(), sys.eventfd()];
  try {
    assert.equal(moveIoeventfds(vm, a, addresses(0xe000_0000, 0xc000), []), undefined);
    const bHome = addresses(0xe100_0000, 0xc040);
    assert.equal(moveIoeventfds(vm, b, bHome, []), undefined);
    // B's modern BAR 4 bytes below A's: queue 0 registers (modern and legacy), queue 1 meets
    // A's queue 0 and is refused; the move is undone.
    const bOnA = addresses(0xe000_0000 - 4, 0xc080);
    assert.match(moveIoeventfds(vm, b, bOnA, bHome) ?? "", /address 0xe0003000 .*EEXIST/);
    // Had queue 0's registrations stayed, making them again would fail with EEXIST.
    vm.ioeventfd(b[0]!, 0xe000_2ffc, { length: 2 });
    vm.ioeventfd(b[0]!, 0xc090, { pio: true, length: 2, datamatch: 0 });
    vm.ioeventfd(b[0]!, 0xe000_2ffc, { length: 2, deassign: true });
    vm.ioeventfd(b[0]!, 0xc090, { pio: true, length: 2, datamatch: 0, deassign: true });
    // A still holds its addresses: B cannot have them either way.
    assert.throws(() => vm.ioeventfd(b[0]!, 0xe000_3000, { length: 2 }), /EEXIST/);
    // B moves back home: the stale record (bOnA) names nothing of anyone's, and all of B registers.
    assert.equal(moveIoeventfds(vm, b, bHome, bOnA), undefined);
    assert.throws(() => vm.ioeventfd(b[1]!, 0xe100_3004, { length: 2 }), /EEXIST/, "B is registered at home again");
  } finally {
    for (const fd of [...a, ...b]) sys.close(fd);
    vm.close();
    kvm.close();
  }
});
