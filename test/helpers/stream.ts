/**
 * The `-netdev stream` framing as a test's fake peer (passt) speaks it: frames after their
 * 32-bit big-endian length, over the other end of a socketpair.
 */
import assert from "node:assert/strict";
import { after } from "node:test";
import * as sys from "../../src/sys/libc";
import { STREAM_LENGTH_BYTES } from "../../src/host/net-stream";

/** [length BE32][frame] for each frame, concatenated. */
export function encodeFrames(...frames: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(frames.reduce((s, f) => s + STREAM_LENGTH_BYTES + f.length, 0));
  const v = new DataView(out.buffer);
  let at = 0;
  for (const f of frames) {
    v.setUint32(at, f.length, false);
    out.set(f, at + STREAM_LENGTH_BYTES);
    at += STREAM_LENGTH_BYTES + f.length;
  }
  return out;
}

/** Split a stream into frames; asserts that it ends on a frame boundary (no frame cut). */
export function decodeFrames(bytes: Uint8Array): Uint8Array[] {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out: Uint8Array[] = [];
  let at = 0;
  while (at < bytes.length) {
    assert.ok(bytes.length - at >= STREAM_LENGTH_BYTES, `a cut length word at ${at}`);
    const len = v.getUint32(at, false);
    assert.ok(bytes.length - at - STREAM_LENGTH_BYTES >= len, `a cut ${len}-byte frame at ${at}`);
    out.push(new Uint8Array(bytes.subarray(at + STREAM_LENGTH_BYTES, at + STREAM_LENGTH_BYTES + len)));
    at += STREAM_LENGTH_BYTES + len;
  }
  return out;
}

/** Everything a non-blocking fd has to read now. */
export function drain(fd: number): Uint8Array {
  const chunks: Uint8Array[] = [];
  const buf = new Uint8Array(1 << 20);
  for (let n = sys.read(fd, buf); n > 0; n = sys.read(fd, buf)) chunks.push(buf.slice(0, n));
  return Buffer.concat(chunks);
}

/** Write all of `bytes` (a blocking fd, or one with room). */
export function writeAll(fd: number, bytes: Uint8Array): void {
  for (let done = 0; done < bytes.length; ) done += sys.write(fd, bytes.subarray(done));
}

const opened: number[] = [];

/**
 * A UNIX stream socketpair [ours, peer's], closed after the test file's tests (fds a test
 * closed itself are skipped). `flags`: e.g. SOCK_NONBLOCK for both ends.
 */
export function streamPair(flags = 0): [number, number] {
  const pair = sys.socketpair(sys.AF_UNIX, sys.SOCK_STREAM | flags);
  if (opened.length === 0) {
    after(() => {
      for (const fd of opened.splice(0)) {
        try {
          sys.close(fd);
        } catch {
          // closed by the test
        }
      }
    });
  }
  opened.push(...pair);
  return pair;
}
