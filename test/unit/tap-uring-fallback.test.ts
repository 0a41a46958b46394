/**
 * A TAP whose kernel cannot do RWF_NOWAIT through io_uring (Debian 6.1's tun answers
 * -EOPNOTSUPP, seen in the harness VM): the frames of that batch and every later one go by
 * writev/readv instead, in order, none lost. The TAP is a SOCK_SEQPACKET socketpair end (one
 * frame per message, as a TAP) and the ring a fake that refuses like that kernel.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { constants } from "node:os";
import * as sys from "../../src/sys/libc";
import { Tap } from "../../src/host/tap";
import { FrameBatch } from "../../src/devices/virtio/net/backend";
import type { IoUring } from "../../src/sys/io-uring";
import { hostAddressOf } from "../../src/memory/iovec";

const EOPNOTSUPP = constants.errno.EOPNOTSUPP;
const ECANCELED = constants.errno.ECANCELED;
const AF_UNIX = 1;

/** A ring that refuses every request like a kernel without RWF_NOWAIT on the fd. */
function refusingRing(): { ring: IoUring; prepared: () => number } {
  let tags: number[] = [];
  let completions: { tag: number; res: number }[] = [];
  let prepared = 0;
  const prep = (_fd: number, _iov: number, _n: number, _off: number, tag: number) => {
    tags.push(tag);
    prepared++;
  };
  const ring = {
    sqEntries: 8,
    prepWritev: prep,
    prepReadv: prep,
    submitAndWait: () => {
      // The first is refused; linked writes after it are cancelled.
      completions = tags.map((tag, i) => ({ tag, res: i === 0 ? -EOPNOTSUPP : -ECANCELED }));
      tags = [];
      return completions.length;
    },
    completionCount: () => completions.length,
    completionTag: (i: number) => completions[i]!.tag,
    completionResult: (i: number) => completions[i]!.res,
    consumeCompletions: () => {
      completions = [];
    },
  };
  return { ring: ring as unknown as IoUring, prepared: () => prepared };
}

function batchOf(frames: Uint8Array[]): FrameBatch {
  const b = new FrameBatch(frames.length, frames.length);
  for (const f of frames) {
    const k = b.begin();
    b.iov.push(hostAddressOf(f), f.length);
    b.end(k);
  }
  return b;
}

test("TX: a ring that refuses RWF_NOWAIT hands the batch to writev, in order, and is not used again", () => {
  const [ours, theirs] = sys.socketpair(AF_UNIX, sys.SOCK_SEQPACKET);
  try {
    const tap = new Tap("tap-test", ours, false, 12);
    const { ring, prepared } = refusingRing();
    tap.useRing(ring);
    const frames = [1, 2, 3].map((n) => new Uint8Array(60).fill(n));
    const b = batchOf(frames);
    tap.writeFrames(b, 0);
    assert.deepEqual([...b.result.subarray(0, 3)], [60, 60, 60]);
    const used = prepared();
    const more = batchOf([new Uint8Array(60).fill(4)]);
    tap.writeFrames(more, 0);
    assert.equal(more.result[0], 60);
    assert.equal(prepared(), used, "the ring is not used after it refused");
    const got = new Uint8Array(100);
    for (const n of [1, 2, 3, 4]) {
      assert.equal(sys.read(theirs, got), 60);
      assert.equal(got[0], n, "frames arrive in order");
    }
  } finally {
    sys.close(ours);
    sys.close(theirs);
  }
});

test("RX: a ring that refuses RWF_NOWAIT reads the batch by readv instead", () => {
  const [ours, theirs] = sys.socketpair(AF_UNIX, sys.SOCK_SEQPACKET);
  try {
    const tap = new Tap("tap-test", ours, false, 12);
    tap.useRing(refusingRing().ring);
    for (const n of [7, 8]) sys.write(theirs, new Uint8Array(40).fill(n));
    const bufs = [new Uint8Array(100), new Uint8Array(100)];
    const b = batchOf(bufs);
    tap.readFrames(b);
    assert.deepEqual([...b.result.subarray(0, 2)], [40, 40]);
    assert.deepEqual([bufs[0]![0], bufs[1]![0]], [7, 8]);
  } finally {
    sys.close(ours);
    sys.close(theirs);
  }
});
