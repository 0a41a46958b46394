/**
 * src/sys/poll-set.ts on real fds: readiness by slot, disabled slots skipped, timeouts,
 * hang-ups, and slots edited between waits.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import * as sys from "../../src/sys/libc";
import { PollSet } from "../../src/sys/poll-set";

const one = new Uint8Array(new BigUint64Array([1n]).buffer);

describe("PollSet", () => {
  it("reports which slots are ready, and nothing after a timeout", () => {
    const a = sys.eventfd(0, sys.EFD_NONBLOCK);
    const b = sys.eventfd(0, sys.EFD_NONBLOCK);
    try {
      const set = new PollSet(4);
      assert.equal(set.add(a, sys.POLLIN), 0);
      assert.equal(set.add(b, sys.POLLIN), 1);
      assert.equal(set.size, 2);
      assert.equal(set.wait(0), 0);
      assert.equal(set.revents(0), 0);
      sys.write(b, one);
      assert.equal(set.wait(1000), 1);
      assert.equal(set.revents(0), 0);
      assert.equal(set.revents(1), sys.POLLIN);
      sys.write(a, one);
      assert.equal(set.wait(-1), 2);
      assert.equal(set.revents(0) & sys.POLLIN, sys.POLLIN);
    } finally {
      sys.close(a);
      sys.close(b);
    }
  });

  it("skips a slot whose events are 0, and watches it again once they are not", () => {
    const a = sys.eventfd(1, sys.EFD_NONBLOCK); // readable from the start
    try {
      const set = new PollSet(1);
      set.add(a, 0);
      assert.equal(set.fd(0), a);
      assert.equal(set.wait(0), 0);
      assert.equal(set.revents(0), 0);
      set.setEvents(0, sys.POLLIN);
      assert.equal(set.wait(0), 1);
      assert.equal(set.revents(0), sys.POLLIN);
      set.setEvents(0, 0);
      assert.equal(set.wait(0), 0);
      assert.equal(set.fd(0), a);
    } finally {
      sys.close(a);
    }
  });

  it("reports POLLOUT and a hang-up on pipes", () => {
    const [r, w] = sys.pipe2(sys.O_NONBLOCK);
    const set = new PollSet(2);
    set.add(r, sys.POLLIN);
    set.add(w, sys.POLLOUT);
    assert.equal(set.wait(0), 1);
    assert.equal(set.revents(1), sys.POLLOUT);
    sys.close(w);
    set.set(1, r, 0);
    assert.equal(set.wait(0), 1);
    assert.ok((set.revents(0) & sys.POLLHUP) !== 0);
    sys.close(r);
  });

  it("refuses more slots than it holds", () => {
    const set = new PollSet(1);
    set.add(0, 0);
    assert.throws(() => set.add(0, 0), RangeError);
    assert.throws(() => new PollSet(0), RangeError);
  });
});
