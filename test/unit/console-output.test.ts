/**
 * COM1's buffered output (board/console-output.ts): about one write(2) per line, partial
 * lines written by the main thread soon after, nothing lost or reordered at the end, the
 * tagged pairs of the `run` mux byte-exact, and a reader that stops reading never holds a
 * stopping VM (or the main thread) for good.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Worker } from "node:worker_threads";
import {
  ConsoleBuffer,
  ConsoleFlusher,
  CONSOLE_BUFFER_BYTES,
  fdWriter,
  type ConsoleWriter,
} from "../../src/board/console-output";
import { ChannelDemux } from "../../src/api/protocol";
import * as sys from "../../src/sys/libc";
import { waitUntil } from "../helpers/wait";

/** A writer that records each write(2) it stands for. */
class CountingWriter implements ConsoleWriter {
  readonly writes: Buffer[] = [];
  writeAll(bytes: Uint8Array): boolean {
    this.writes.push(Buffer.from(bytes));
    return true;
  }
  writeIfRoom(bytes: Uint8Array): number {
    this.writes.push(Buffer.from(bytes));
    return bytes.byteLength;
  }
  get text(): string {
    return Buffer.concat(this.writes).toString("latin1");
  }
}

function byteByByte(sink: { write(b: Uint8Array): void }, text: string | Uint8Array): void {
  for (const b of typeof text === "string" ? Buffer.from(text, "latin1") : text) sink.write(Uint8Array.of(b));
}

/** A pipe whose read end never blocks; `drain()` reads everything in it now. */
class Pipe {
  readonly read: number;
  readonly write: number;
  private got: Buffer[] = [];
  constructor(flags = 0) {
    [this.read, this.write] = sys.pipe2(flags);
    sys.fcntl(this.read, sys.F_SETFL, sys.fcntl(this.read, sys.F_GETFL) | sys.O_NONBLOCK);
  }
  /** Each read(2)'s bytes, in order, including earlier drains. */
  drain(): Buffer[] {
    const buf = new Uint8Array(1 << 16);
    for (;;) {
      const n = sys.read(this.read, buf);
      if (n <= 0) return this.got;
      this.got.push(Buffer.from(buf.subarray(0, n)));
    }
  }
  get text(): string {
    return Buffer.concat(this.drain()).toString("latin1");
  }
  /** Fill the pipe until it takes no more (needs a non-blocking write end). */
  fill(): void {
    const junk = new Uint8Array(4096);
    while (sys.write(this.write, junk) > 0);
  }
  close(): void {
    sys.close(this.read);
    sys.close(this.write);
  }
}

describe("console output buffer", () => {
  it("writes a line typed byte by byte in one write, once the newline comes", () => {
    const w = new CountingWriter();
    const c = new ConsoleBuffer(ConsoleBuffer.create(), w);
    byteByByte(c, "[    0.000000] Linux version 6.1\n");
    byteByByte(c, "second line");
    assert.deepEqual(w.writes.map((b) => b.toString("latin1")), ["[    0.000000] Linux version 6.1\n"]);
    assert.equal(c.pending, "second line".length);
    // A newline in the middle of a longer write takes everything before and after it.
    c.write(Buffer.from(" ends\nand more"));
    assert.deepEqual(w.writes.map((b) => b.toString("latin1")).slice(1), ["second line ends\nand more"]);
    assert.equal(c.pending, 0);
  });

  it("reaches a pipe through write(2): one per line", () => {
    const p = new Pipe();
    try {
      const fd = fdWriter(p.write);
      let writes = 0;
      const c = new ConsoleBuffer(ConsoleBuffer.create(), { writeAll: (b) => (writes++, fd.writeAll(b)), writeIfRoom: (b) => (writes++, fd.writeIfRoom(b)) });
      byteByByte(c, "one line\n");
      byteByByte(c, "another\n");
      assert.equal(writes, 2);
      assert.equal(p.text, "one line\nanother\n");
    } finally {
      p.close();
    }
  });

  it("writes out a full buffer without waiting for a newline", () => {
    const w = new CountingWriter();
    const c = new ConsoleBuffer(ConsoleBuffer.create(), w);
    const text = Buffer.alloc(CONSOLE_BUFFER_BYTES + 10, "x");
    byteByByte(c, text);
    assert.deepEqual(w.writes.map((b) => b.byteLength), [CONSOLE_BUFFER_BYTES]);
    assert.equal(c.pending, 10);
    // One big write: buffer-sized pieces, in order.
    const w2 = new CountingWriter();
    const c2 = new ConsoleBuffer(ConsoleBuffer.create(), w2);
    const big = Buffer.from(Array.from({ length: 3 * CONSOLE_BUFFER_BYTES }, (_, i) => 0x20 + (i % 90)));
    c2.write(big);
    // (a buffer left full at the end of a write goes out too: the next byte could not fit)
    assert.deepEqual(w2.writes.map((b) => b.byteLength), [CONSOLE_BUFFER_BYTES, CONSOLE_BUFFER_BYTES, CONSOLE_BUFFER_BYTES]);
    assert.deepEqual(Buffer.concat(w2.writes), big);
    assert.equal(c2.pending, 0);
  });

  it("tagged: every byte value as a [tag, byte] pair, byte-exact, in whole pairs per write", () => {
    const w = new CountingWriter();
    const c = new ConsoleBuffer(ConsoleBuffer.create(), w, 7);
    const all = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
    byteByByte(c, all); // holds one newline (0x0a): one write up to it
    const full = Buffer.alloc(CONSOLE_BUFFER_BYTES, "y"); // 2 buffers' worth of pairs
    c.write(full);
    c.write(Buffer.from("end\n"));
    for (const out of w.writes) assert.equal(out.byteLength % 2, 0, "whole pairs");
    assert.ok(w.writes.every((out) => out.byteLength <= sys.PIPE_BUF), "each write is atomic on a pipe");
    const got: Buffer[] = [];
    const demux = new ChannelDemux((tag, bytes) => {
      assert.equal(tag, 7);
      got.push(bytes);
    });
    for (const out of w.writes) demux.push(out);
    assert.deepEqual(Buffer.concat(got), Buffer.concat([all, full, Buffer.from("end\n")]));
    assert.equal(c.pending, 0);
    assert.throws(() => new ConsoleBuffer(ConsoleBuffer.create(), w, 256), RangeError);
  });

  it("keeps the order of appends across two sinks over one buffer", () => {
    const w = new CountingWriter();
    const shared = ConsoleBuffer.create();
    const a = new ConsoleBuffer(shared, w);
    const b = new ConsoleBuffer(shared, w);
    a.write(Buffer.from("a"));
    b.write(Buffer.from("b"));
    a.write(Buffer.from("c"));
    b.write(Buffer.from("\n"));
    assert.deepEqual(w.writes.map((x) => x.toString()), ["abc\n"]);
  });

  it("keeps each thread's bytes in order when two workers write byte by byte at once", async () => {
    const p = new Pipe();
    const shared = ConsoleBuffer.create();
    const lines = 1500;
    // Disjoint alphabets, so each thread's bytes can be picked out of the mix: A writes
    // digits as a..j and ends lines with \n, B writes them as A..J and ends lines with \r
    // (which writes nothing out: B's bytes leave with A's lines, a full buffer, or the end).
    const expect = (base: number, end: string) =>
      Array.from({ length: lines }, (_, i) => String(i).replace(/[0-9]/g, (d) => String.fromCharCode(base + Number(d))) + end).join("");
    const source = `
      const { workerData } = require("node:worker_threads");
      const { ConsoleBuffer, fdWriter } = require(workerData.modulePath);
      const c = new ConsoleBuffer(workerData.shared, fdWriter(workerData.fd));
      for (const b of Buffer.from(workerData.text, "latin1")) c.write(Uint8Array.of(b));`;
    const modulePath = require.resolve("../../src/board/console-output");
    let text = "";
    try {
      const done = [expect(0x61, "\n"), expect(0x41, "\r")].map(
        (t) =>
          new Promise<void>((resolve, reject) => {
            const worker = new Worker(source, { eval: true, workerData: { modulePath, shared, fd: p.write, text: t } });
            worker.on("error", reject);
            worker.on("exit", (code) => (code === 0 ? resolve() : reject(new Error(`a writer exited ${code}`))));
          }),
      );
      // Read while they write: the pipe may be smaller than all the output.
      let finished = false;
      void Promise.all(done).then(() => (finished = true));
      await waitUntil(() => {
        text += Buffer.concat(p.drain().splice(0)).toString("latin1");
        return finished;
      }, 60_000, "both writers", 1);
      await Promise.all(done);
      // What is left after the last \n, as the machine's final write-out would.
      assert.equal(new ConsoleBuffer(shared, fdWriter(p.write)).writeOutIfRoom(), true);
      text += Buffer.concat(p.drain().splice(0)).toString("latin1");
    } finally {
      p.close();
    }
    assert.equal(text.replace(/[^a-j\n]/g, ""), expect(0x61, "\n"), "A's bytes, all, in order");
    assert.equal(text.replace(/[^A-J\r]/g, ""), expect(0x41, "\r"), "B's bytes, all, in order");
    assert.equal(text.length, 2 * expect(0x61, "\n").length, "nothing else");
  });

  it("a partial line is written by the main thread's flusher soon after, without a newline", async () => {
    const p = new Pipe();
    const shared = ConsoleBuffer.create();
    const fd = fdWriter(p.write);
    let writes = 0;
    const flusher = new ConsoleFlusher(new ConsoleBuffer(shared, { ...fd, writeIfRoom: (b) => (writes++, fd.writeIfRoom(b)) }), (e) => assert.fail(e));
    flusher.start();
    try {
      // Another "thread" (a sink over the same memory) writes a prompt and stops.
      const vcpu = new ConsoleBuffer(shared, fdWriter(p.write));
      byteByByte(vcpu, "login: ");
      let got = "";
      await waitUntil(() => (got += Buffer.concat(p.drain().splice(0)).toString("latin1")) === "login: ", 10_000, "the prompt on the pipe", 2);
      assert.equal(vcpu.pending, 0);
      assert.equal(writes, 1, "the prompt's bytes in one write");
      // And again, after the flusher went back to waiting.
      vcpu.write(Buffer.from("ok"));
      await waitUntil(() => (got += Buffer.concat(p.drain().splice(0)).toString("latin1")) === "login: ok", 10_000, "the second partial line", 2);
    } finally {
      await flusher.finish();
      p.close();
    }
  });

  it("finish() writes out what is left at once, without the delay", async () => {
    const w = new CountingWriter();
    const c = new ConsoleBuffer(ConsoleBuffer.create(), w);
    const flusher = new ConsoleFlusher(c, (e) => assert.fail(e), 60_000);
    flusher.start();
    byteByByte(c, "reboot: Power down");
    // The delay is a minute: only finish() can have written it.
    await flusher.finish();
    assert.equal(w.text, "reboot: Power down");
    assert.equal(c.pending, 0);
  });

  it("the main thread never waits for a full pipe, even a blocking one: its writes wait for room", async () => {
    const p = new Pipe(sys.O_NONBLOCK);
    try {
      p.fill();
      // Blocking from now on: a write(2) here would hang this thread, the pipe's reader.
      sys.fcntl(p.write, sys.F_SETFL, sys.fcntl(p.write, sys.F_GETFL) & ~sys.O_NONBLOCK);
      assert.equal(sys.writeIfRoom(p.write, Buffer.from("x")), 0);
      const shared = ConsoleBuffer.create();
      const c = new ConsoleBuffer(shared, fdWriter(p.write));
      const flusher = new ConsoleFlusher(c, (e) => assert.fail(e));
      flusher.start();
      // As a vCPU thread would (with the newline it would write itself): a partial line.
      new ConsoleBuffer(shared, fdWriter(p.write)).write(Buffer.from("tail"));
      assert.equal(c.pending, 4);
      // The reader reads; the rest goes out, and at the end nothing is left.
      const finished = flusher.finish(60_000);
      let got = "";
      await waitUntil(() => (got = p.text).endsWith("tail"), 10_000, "the tail after the junk", 2);
      await finished;
      assert.equal(got.length, got.indexOf("tail") + 4);
    } finally {
      p.close();
    }
  });

  it("gives up on a reader that stopped reading once the VM is stopping, and not before", async () => {
    const p = new Pipe(sys.O_NONBLOCK);
    try {
      p.fill();
      const shared = ConsoleBuffer.create();
      const stop = new Int32Array(new SharedArrayBuffer(4));
      const c = new ConsoleBuffer(shared, fdWriter(p.write, () => Atomics.load(stop, 0) !== 0));
      c.write(Buffer.from("partial"));
      // A vCPU thread's write-out (a newline) waits for room while the VM runs...
      const worker = new Worker(
        `const { workerData } = require("node:worker_threads");
         const { ConsoleBuffer, fdWriter } = require(workerData.modulePath);
         const stop = new Int32Array(workerData.stop);
         new ConsoleBuffer(workerData.shared, fdWriter(workerData.fd, () => Atomics.load(stop, 0) !== 0)).write(Buffer.from(" line\\n"));`,
        { eval: true, workerData: { modulePath: require.resolve("../../src/board/console-output"), shared, fd: p.write, stop: stop.buffer } },
      );
      let exitCode: number | undefined;
      worker.on("exit", (code) => (exitCode = code));
      // (it holds the buffer: the main thread cannot take it, and does not wait for it)
      await waitUntil(() => c.pending === 0 && !c.writeOutIfRoom(), 10_000, "the writer to hold the buffer", 5);
      assert.equal(exitCode, undefined);
      // ...and gives up once it is stopping: the thread goes on (and ends).
      Atomics.store(stop, 0, 1);
      await waitUntil(() => exitCode !== undefined, 10_000, "the writer to give up", 5);
      assert.equal(exitCode, 0);
      // The final write-out on the main thread gives up on the full pipe too.
      c.write(Buffer.from("more"));
      // (a pause's drain gives up too, but keeps the rest for later)
      assert.equal(await new ConsoleFlusher(c, (e) => assert.fail(e)).drain(100), false);
      assert.equal(c.pending, 4);
      await new ConsoleFlusher(c, (e) => assert.fail(e)).finish(200);
      assert.equal(c.pending, 0, "the rest is dropped");
    } finally {
      p.close();
    }
  });

});
