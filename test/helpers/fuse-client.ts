/**
 * A FUSE client that talks to a real virtiofsd the way a guest's virtio-fs driver does,
 * without a VM: "guest RAM" is a memfd this process maps, the virtqueues are laid out in it
 * by VirtqDriver, tskvm's vhost-user front end hands both to virtiofsd, and each request is
 * a descriptor chain published, kicked through the kick eventfd, and answered through the
 * call eventfd. For tests of the vhost-user path and of virtiofsd's behaviour.
 */
import * as sys from "../../src/sys/libc";
import { memfdCreate, ftruncate } from "../../src/sys/memfd";
import { GuestMemory } from "../../src/memory/guest-memory";
import type { VhostUserFrontend } from "../../src/host/vhost-user/frontend";
import {
  FUSE_IN_HEADER_SIZE,
  FUSE_OUT_HEADER_SIZE,
  FuseOpcode,
  decodeOutHeader,
  encodeInHeader,
} from "../../src/devices/virtio/fs/fuse";
import { VirtqDriver } from "./virtq-driver";

const RAM_BYTES = 16 * 1024 * 1024;
const QUEUE_SIZE = 64;

export interface FuseReply {
  /** 0 or a negative errno. */
  error: number;
  body: Uint8Array;
}

export class FuseClient {
  readonly memfd: number;
  readonly memory: GuestMemory;
  private readonly address: bigint;
  readonly hiprio: VirtqDriver;
  readonly requests: VirtqDriver;
  readonly kickFds: number[];
  readonly callFds: number[];
  private unique = 1n;

  /** Map the RAM, give it and both queues to the back end behind `frontend` (after its handshake). */
  constructor(readonly frontend: VhostUserFrontend) {
    this.memfd = memfdCreate("fuse-client-ram");
    ftruncate(this.memfd, RAM_BYTES);
    this.address = sys.mmap(RAM_BYTES, sys.PROT_READ | sys.PROT_WRITE, sys.MAP_SHARED, this.memfd, 0);
    this.memory = GuestMemory.attach([{ base: 0, size: RAM_BYTES, hostAddress: this.address }]);
    this.hiprio = new VirtqDriver(this.memory, { size: QUEUE_SIZE, index: 0, ringBase: 0x10000, dataBase: 0x100000, dataEnd: 0x200000 });
    this.requests = new VirtqDriver(this.memory, { size: QUEUE_SIZE, index: 1, ringBase: 0x20000, dataBase: 0x200000, dataEnd: RAM_BYTES });
    this.kickFds = [sys.eventfd(), sys.eventfd()];
    this.callFds = [sys.eventfd(0, sys.EFD_NONBLOCK), sys.eventfd(0, sys.EFD_NONBLOCK)];
    frontend.setMemTable([{ guestAddress: 0n, size: BigInt(RAM_BYTES), userAddress: this.address, mmapOffset: 0n, fd: this.memfd }]);
    const host = (gpa: number): bigint => this.address + BigInt(gpa);
    frontend.start(
      1n << 32n,
      [this.hiprio, this.requests].map((q, i) => ({
        index: i,
        size: q.size,
        descAddress: host(q.descAddr),
        availAddress: host(q.availAddr),
        usedAddress: host(q.usedAddr),
        base: 0,
        kickFd: this.kickFds[i]!,
        callFd: this.callFds[i]!,
      })),
    );
  }

  /**
   * Send one request on the request queue and wait (up to `timeoutMs`) for its reply.
   * Returns null when no reply came in time.
   */
  request(opcode: number, nodeid: bigint, body: Uint8Array, replyBytes = 4096, timeoutMs = 10_000): FuseReply | null {
    const unique = this.unique++;
    const input = new Uint8Array(FUSE_IN_HEADER_SIZE + body.byteLength);
    encodeInHeader({ len: input.byteLength, opcode, unique, nodeid }, input);
    input.set(body, FUSE_IN_HEADER_SIZE);
    const q = this.requests;
    const out = q.writable(FUSE_OUT_HEADER_SIZE + replyBytes, 0);
    q.add([q.readable(input), out]);
    sys.write(this.kickFds[1]!, new Uint8Array(new BigUint64Array([1n]).buffer));
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const used = q.used();
      if (used.length > 0) {
        const reply = this.memory.slice(out.addr, used[0]!.len).slice();
        const h = decodeOutHeader(reply);
        if (h.unique !== unique) throw new Error(`FUSE reply for ${h.unique}, expected ${unique}`);
        return { error: h.error, body: reply.subarray(FUSE_OUT_HEADER_SIZE, h.len) };
      }
      const left = deadline - Date.now();
      if (left <= 0) return null;
      sys.pollOne(this.callFds[1]!, sys.POLLIN, Math.min(left, 200));
      sys.read(this.callFds[1]!, new Uint8Array(8));
    }
  }

  /**
   * Several requests made available at once, one kick: the order of the answers in the used
   * ring (as indices into `requests`).
   */
  answerOrder(requests: readonly { opcode: number; nodeid: bigint; body: Uint8Array }[], timeoutMs = 10_000): number[] {
    const q = this.requests;
    const heads = requests.map((r) => {
      const unique = this.unique++;
      const input = new Uint8Array(FUSE_IN_HEADER_SIZE + r.body.byteLength);
      encodeInHeader({ len: input.byteLength, opcode: r.opcode, unique, nodeid: r.nodeid }, input);
      input.set(r.body, FUSE_IN_HEADER_SIZE);
      return q.addChain([q.readable(input), q.writable(FUSE_OUT_HEADER_SIZE + 4096, 0)]);
    });
    for (const h of heads) q.publish(h);
    sys.write(this.kickFds[1]!, new Uint8Array(new BigUint64Array([1n]).buffer));
    const order: number[] = [];
    const deadline = Date.now() + timeoutMs;
    while (order.length < heads.length && Date.now() < deadline) {
      for (const u of q.used()) order.push(heads.indexOf(u.id));
      if (order.length < heads.length) sys.pollOne(this.callFds[1]!, sys.POLLIN, 100);
    }
    return order;
  }

  /** FUSE_INIT: the protocol version virtiofsd answers (major, minor). */
  init(): { major: number; minor: number } {
    const body = new Uint8Array(64);
    const dv = new DataView(body.buffer);
    dv.setUint32(0, 7, true);
    dv.setUint32(4, 36, true);
    dv.setUint32(8, 0x20000, true);
    const r = this.expectOk(FuseOpcode.INIT, 0n, body, "INIT");
    const out = new DataView(r.buffer, r.byteOffset);
    return { major: out.getUint32(0, true), minor: out.getUint32(4, true) };
  }

  /** LOOKUP name in directory `parent` (1: the share's root): the node id, or a negative errno. */
  lookup(parent: bigint, name: string): bigint | number {
    const r = this.request(FuseOpcode.LOOKUP, parent, cstring(name));
    if (r === null) throw new Error("LOOKUP: no reply");
    if (r.error !== 0) return r.error;
    return new DataView(r.body.buffer, r.body.byteOffset).getBigUint64(0, true);
  }

  /** OPEN + READ + RELEASE of a whole small file. */
  readFile(nodeid: bigint, max = 65536): string {
    const open = new Uint8Array(8); // flags O_RDONLY, open_flags 0
    const opened = this.expectOk(FuseOpcode.OPEN, nodeid, open, "OPEN");
    const fh = new DataView(opened.buffer, opened.byteOffset).getBigUint64(0, true);
    const read = new Uint8Array(40);
    const dv = new DataView(read.buffer);
    dv.setBigUint64(0, fh, true);
    dv.setUint32(16, max, true);
    const data = this.expectOk(FuseOpcode.READ, nodeid, read, "READ", max);
    this.release(nodeid, fh);
    return Buffer.from(data).toString("utf8");
  }

  /** CREATE name in `parent` and WRITE `text` into it; a negative errno when refused. */
  createFile(parent: bigint, name: string, text: string): number {
    const body = new Uint8Array(16 + Buffer.byteLength(name) + 1);
    const dv = new DataView(body.buffer);
    dv.setUint32(0, 0o1 | 0o100 /* O_WRONLY|O_CREAT */, true);
    dv.setUint32(4, 0o100644, true);
    dv.setUint32(8, 0o022, true);
    body.set(cstring(name), 16);
    const r = this.request(FuseOpcode.CREATE, parent, body);
    if (r === null) throw new Error("CREATE: no reply");
    if (r.error !== 0) return r.error;
    const nodeid = new DataView(r.body.buffer, r.body.byteOffset).getBigUint64(0, true);
    const fh = new DataView(r.body.buffer, r.body.byteOffset).getBigUint64(128, true);
    const data = Buffer.from(text);
    const write = new Uint8Array(40 + data.length);
    const wv = new DataView(write.buffer);
    wv.setBigUint64(0, fh, true);
    wv.setUint32(16, data.length, true);
    write.set(data, 40);
    const w = this.request(FuseOpcode.WRITE, nodeid, write);
    if (w === null) throw new Error("WRITE: no reply");
    this.release(nodeid, fh);
    return w.error;
  }

  close(): void {
    for (const fd of [...this.kickFds, ...this.callFds, this.memfd]) sys.close(fd);
    // The mapping stays: views over it may still be alive in this test process.
  }

  private release(nodeid: bigint, fh: bigint): void {
    const body = new Uint8Array(24);
    new DataView(body.buffer).setBigUint64(0, fh, true);
    this.request(FuseOpcode.RELEASE, nodeid, body);
  }

  private expectOk(opcode: number, nodeid: bigint, body: Uint8Array, what: string, replyBytes = 4096): Uint8Array {
    const r = this.request(opcode, nodeid, body, replyBytes);
    if (r === null) throw new Error(`${what}: no reply from virtiofsd`);
    if (r.error !== 0) throw new Error(`${what}: error ${r.error}`);
    return r.body;
  }
}

function cstring(s: string): Uint8Array {
  const b = Buffer.from(`${s}\0`, "utf8");
  return new Uint8Array(b.buffer, b.byteOffset, b.length);
}
