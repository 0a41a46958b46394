/**
 * A fake vhost-user back end for unit tests of the front end. It runs in a worker thread on
 * one end of a socketpair, answers like libvhost-user (virtiofsd's library) does, and can be
 * told to misbehave at one request: answer for another request, stop mid-message, say
 * nothing, send a huge size, refuse, split its answer over several writes, flood
 * descriptors, or hang up. It records every request it saw and posts the log when the
 * connection ends.
 *
 * startFakeBackend() is the test's handle; the worker body is this same file.
 */
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";
import * as sys from "../../src/sys/libc";
import { recvmsg, sendmsg } from "../../src/sys/socket";
import {
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  HEADER_SIZE,
  ProtocolFeature,
  Request,
  VERSION,
  bit,
  decodeHeader,
  decodeMemTable,
  decodeVringState,
  encodeMessage,
  encodeU64,
  encodeVringState,
} from "../../src/host/vhost-user/protocol";

export type Fault =
  | "wrong-reply-id"
  | "eof-mid-message"
  | "eof"
  | "silent"
  | "huge-size"
  | "refuse"
  | "split"
  | "fd-flood"
  | "no-reply-flag"
  | "bad-version";

export interface FakeBackendOptions {
  /** GET_FEATURES answer (default: what virtiofsd 7.2 offers). */
  features?: bigint;
  /** GET_PROTOCOL_FEATURES answer (default: virtiofsd 7.2's). */
  protocolFeatures?: bigint;
  queueNum?: number;
  /** Misbehave when this request arrives. */
  faultAt?: number;
  fault?: Fault;
  /** GET_VRING_BASE answers the base it was given plus this (requests it "served"). */
  served?: number;
}

export interface LoggedRequest {
  request: number;
  flags: number;
  payload: number[];
  fdCount: number;
  /** For SET_MEM_TABLE: the first 8 bytes of each region read through its descriptor. */
  regionHeads?: string[];
}

/** virtiofsd 7.2 (measured): VERSION_1, NOTIFY_ON_EMPTY, INDIRECT, EVENT_IDX, PROTOCOL_FEATURES, LOG_ALL. */
export const VIRTIOFSD_FEATURES = 0x175000000n;
/** virtiofsd 7.2 (measured): MQ, LOG_SHMFD, REPLY_ACK, BACKEND_REQ, BACKEND_SEND_FD, HOST_NOTIFIER, CONFIGURE_MEM_SLOTS. */
export const VIRTIOFSD_PROTOCOL_FEATURES = 0x8c2bn;

export interface FakeBackend {
  /** The requests seen, once the connection has ended. */
  readonly log: Promise<LoggedRequest[]>;
}

export function startFakeBackend(fd: number, opts: FakeBackendOptions = {}): FakeBackend {
  const worker = new Worker(__filename, { workerData: { fd, opts } });
  // Resolved once the worker has exited, so that its own descriptors are closed too.
  const log = new Promise<LoggedRequest[]>((resolve, reject) => {
    let seen: LoggedRequest[] | undefined;
    worker.once("message", (m: LoggedRequest[]) => (seen = m));
    worker.once("error", reject);
    worker.once("exit", (code) => (code === 0 && seen !== undefined ? resolve(seen) : reject(new Error(`fake back end exited ${code}`))));
  });
  return { log };
}

// ---- the worker ----

function serve(fd: number, opts: FakeBackendOptions): LoggedRequest[] {
  const log: LoggedRequest[] = [];
  const bases = new Map<number, number>();
  let protocol = 0n;
  const features = opts.features ?? VIRTIOFSD_FEATURES;
  const offered = opts.protocolFeatures ?? VIRTIOFSD_PROTOCOL_FEATURES;
  const readExactly = (n: number, fds: number[]): Uint8Array | null => {
    const buf = new Uint8Array(n);
    let done = 0;
    while (done < n) {
      let r: ReturnType<typeof recvmsg>;
      try {
        r = recvmsg(fd, buf.subarray(done));
      } catch (e) {
        // The front end closed with our last answer unread: the end, like EOF.
        if (e instanceof sys.SysError && e.code === "ECONNRESET") return null;
        throw e;
      }
      if (r === null || r.bytes === 0) return null;
      fds.push(...r.fds);
      done += r.bytes;
    }
    return buf;
  };
  for (;;) {
    const fds: number[] = [];
    const head = readExactly(HEADER_SIZE, fds);
    if (head === null) break;
    const h = decodeHeader(head);
    const payload = h.size > 0 ? readExactly(h.size, fds) : new Uint8Array(0);
    if (payload === null) break;
    const entry: LoggedRequest = { request: h.request, flags: h.flags, payload: [...payload], fdCount: fds.length };
    log.push(entry);

    let reply: Uint8Array | undefined;
    switch (h.request) {
      case Request.GET_FEATURES:
        reply = encodeU64(features);
        break;
      case Request.GET_PROTOCOL_FEATURES:
        reply = encodeU64(offered);
        break;
      case Request.SET_PROTOCOL_FEATURES:
        protocol = new DataView(payload.buffer).getBigUint64(0, true);
        break;
      case Request.GET_QUEUE_NUM:
        reply = encodeU64(BigInt(opts.queueNum ?? 2));
        break;
      case Request.SET_MEM_TABLE: {
        const regions = decodeMemTable(payload);
        entry.regionHeads = regions.map((r, i) => {
          const b = new Uint8Array(8);
          sys.pread(fds[i]!, b, Number(r.mmapOffset));
          return Buffer.from(b).toString("hex");
        });
        break;
      }
      case Request.SET_VRING_BASE: {
        const s = decodeVringState(payload, "base");
        bases.set(s.index, s.num);
        break;
      }
      case Request.GET_VRING_BASE: {
        const s = decodeVringState(payload, "base");
        reply = encodeVringState({ index: s.index, num: ((bases.get(s.index) ?? 0) + (opts.served ?? 0)) & 0xffff });
        break;
      }
    }
    for (const f of fds) sys.close(f);
    const wantsAck = reply === undefined && (h.flags & FLAG_NEED_REPLY) !== 0 && (protocol & bit(ProtocolFeature.REPLY_ACK)) !== 0n;
    if (wantsAck) reply = encodeU64(0n);
    if (reply === undefined) continue;

    let code = h.request;
    let flags = VERSION | FLAG_REPLY;
    if (opts.faultAt === h.request) {
      switch (opts.fault) {
        case "eof":
          return log;
        case "silent":
          continue;
        case "wrong-reply-id":
          code = h.request + 1;
          break;
        case "no-reply-flag":
          flags = VERSION;
          break;
        case "bad-version":
          flags = 2 | FLAG_REPLY;
          break;
        case "refuse":
          reply = encodeU64(1n);
          break;
        case "huge-size": {
          const m = encodeMessage(code, flags, reply);
          new DataView(m.buffer).setUint32(8, 1 << 20, true);
          sys.write(fd, m);
          continue;
        }
        case "eof-mid-message": {
          const m = encodeMessage(code, flags, reply);
          sys.write(fd, m.subarray(0, HEADER_SIZE + 3));
          return log;
        }
        case "split": {
          const m = encodeMessage(code, flags, reply);
          for (let i = 0; i < m.byteLength; i += 5) {
            sys.write(fd, m.slice(i, Math.min(i + 5, m.byteLength)));
            Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 20);
          }
          continue;
        }
        case "fd-flood": {
          const m = encodeMessage(code, flags, reply);
          const extra = [sys.eventfd(), sys.eventfd(), sys.eventfd()];
          // One byte at a time, three descriptors with each: many more than a reply may carry.
          // The front end gives up and hangs up part way: EPIPE ends the flood.
          try {
            for (let i = 0; i < m.byteLength; i++) sendmsg(fd, m.subarray(i, i + 1), extra);
          } catch (e) {
            if (!(e instanceof sys.SysError && e.code === "EPIPE")) throw e;
          }
          for (const f of extra) sys.close(f);
          continue;
        }
      }
    }
    sys.write(fd, encodeMessage(code, flags, reply));
  }
  return log;
}

if (!isMainThread && parentPort !== null && workerData?.fd !== undefined) {
  const { fd, opts } = workerData as { fd: number; opts: FakeBackendOptions };
  const log = serve(fd, opts);
  sys.close(fd);
  parentPort.postMessage(log);
}
