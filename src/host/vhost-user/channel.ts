/**
 * Whole vhost-user messages over a connected UNIX stream socket, with descriptors (SCM_RIGHTS)
 * and a deadline on every exchange. The back end is another process that may be slow, broken
 * or gone: a short read is continued, a partial message at EOF, an oversized payload or
 * silence past the deadline each end in a VhostUserError naming the request, never a hang.
 */
import * as sys from "../../sys/libc";
import { recvmsg, sendmsg } from "../../sys/socket";
import {
  FLAG_REPLY,
  HEADER_SIZE,
  MAX_PAYLOAD,
  VERSION,
  VERSION_MASK,
  VhostUserError,
  decodeHeader,
  encodeMessage,
  requestName,
} from "./protocol";

export interface Message {
  request: number;
  flags: number;
  payload: Uint8Array;
  /** Descriptors that came with the message; the receiver owns (and must close) them. */
  fds: number[];
}

export interface ChannelOptions {
  /** Deadline for one request and its reply (ms). */
  timeoutMs?: number;
  /** A name for messages, e.g. "virtiofsd for share 'src'". */
  peer?: string;
}

export const DEFAULT_TIMEOUT_MS = 10_000;

export class VhostUserChannel {
  readonly timeoutMs: number;
  readonly peer: string;
  private closed = false;

  /** `fd` is a connected stream socket the channel now owns (made non-blocking here). */
  constructor(readonly fd: number, opts: ChannelOptions = {}) {
    this.timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.peer = opts.peer ?? "vhost-user back end";
    sys.fcntl(fd, sys.F_SETFL, sys.fcntl(fd, sys.F_GETFL) | sys.O_NONBLOCK);
  }

  /** Send one message; the fds go with its first byte. */
  send(request: number, flags: number, payload?: Uint8Array, fds: readonly number[] = [], deadline = this.deadline()): void {
    this.checkOpen(request);
    const bytes = encodeMessage(request, flags | VERSION, payload);
    let done = 0;
    while (done < bytes.byteLength) {
      let n: number;
      try {
        n = sendmsg(this.fd, done === 0 ? bytes : bytes.subarray(done), done === 0 ? fds : [], 0);
      } catch (e) {
        if (e instanceof sys.SysError && (e.code === "EPIPE" || e.code === "ECONNRESET")) {
          throw new VhostUserError("closed", `${this.peer} closed the connection (sending ${requestName(request)})`);
        }
        throw e;
      }
      if (n < 0) {
        this.wait(sys.POLLOUT, deadline, request, "sending");
        continue;
      }
      done += n;
    }
  }

  /**
   * Receive one message; `request` names what it answers (for errors). Descriptors that
   * arrive are returned to the caller, also when the message is then rejected as invalid
   * (they are closed here in that case).
   */
  receive(request: number, deadline = this.deadline()): Message {
    this.checkOpen(request);
    const fds: number[] = [];
    try {
      const header = new Uint8Array(HEADER_SIZE);
      this.readFully(header, request, deadline, fds, false);
      const h = decodeHeader(header);
      if (h.size > MAX_PAYLOAD) {
        throw this.protocolError(`a ${h.size}-byte payload for ${requestName(h.request)}`, request);
      }
      const payload = new Uint8Array(h.size);
      if (h.size > 0) this.readFully(payload, request, deadline, fds, true);
      return { request: h.request, flags: h.flags, payload, fds };
    } catch (e) {
      closeQuietly(...fds);
      throw e;
    }
  }

  /**
   * Receive the reply to `request`: same request code, REPLY flag, version 1. Anything else
   * is a protocol error (replies cannot be reordered on one connection).
   */
  receiveReply(request: number, deadline = this.deadline()): Message {
    const m = this.receive(request, deadline);
    const bad = (why: string): never => {
      closeQuietly(...m.fds);
      throw this.protocolError(why, request);
    };
    if (m.request !== request) bad(`a reply to ${requestName(m.request)}`);
    if ((m.flags & VERSION_MASK) !== VERSION) bad(`protocol version ${m.flags & VERSION_MASK}`);
    if ((m.flags & FLAG_REPLY) === 0) bad("a message without the REPLY flag");
    return m;
  }

  deadline(): number {
    return Date.now() + this.timeoutMs;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    closeQuietly(this.fd);
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** True when the back end has hung up (or the socket failed): poll without waiting. */
  peerGone(): boolean {
    if (this.closed) return true;
    const revents = sys.pollOne(this.fd, POLLRDHUP, 0);
    return (revents & (sys.POLLHUP | sys.POLLERR | POLLRDHUP)) !== 0;
  }

  private readFully(into: Uint8Array, request: number, deadline: number, fds: number[], midMessage: boolean): void {
    let done = 0;
    while (done < into.byteLength) {
      const tail = into.subarray(done);
      let got: ReturnType<typeof recvmsg>;
      try {
        got = recvmsg(this.fd, tail);
      } catch (e) {
        if (e instanceof sys.SysError && e.code === "ECONNRESET") got = { bytes: 0, fds: [] };
        else throw e;
      }
      if (got === null) {
        this.wait(sys.POLLIN, deadline, request, "waiting for the reply to");
        continue;
      }
      fds.push(...got.fds);
      if (fds.length > MAX_FDS_PER_REPLY) {
        throw this.protocolError(`${fds.length} file descriptors`, request);
      }
      if (got.bytes === 0) {
        const where = done > 0 || midMessage ? " in the middle of a message" : "";
        throw new VhostUserError("closed", `${this.peer} closed the connection${where} (${requestName(request)})`);
      }
      done += got.bytes;
    }
  }

  private wait(events: number, deadline: number, request: number, doing: string): void {
    const left = deadline - Date.now();
    if (left <= 0) {
      throw new VhostUserError("timeout", `${this.peer} did not answer in ${this.timeoutMs} ms (${doing} ${requestName(request)})`);
    }
    // POLLHUP/POLLERR wake the poll too; the next read or write reports them.
    sys.pollOne(this.fd, events, Math.min(left, 1000));
  }

  private protocolError(what: string, request: number): VhostUserError {
    return new VhostUserError("protocol", `${this.peer} sent ${what} (expected the reply to ${requestName(request)})`);
  }

  private checkOpen(request: number): void {
    if (this.closed) throw new VhostUserError("closed", `the connection to ${this.peer} is closed (${requestName(request)})`);
  }
}

/** No reply tskvm asks for carries descriptors; a few are tolerated (and closed), not a flood. */
const MAX_FDS_PER_REPLY = 8;

/** poll(2)'s POLLRDHUP: the peer shut down its writing side (or closed). */
const POLLRDHUP = 0x2000;

/** Close descriptors a peer sent that nobody will use. */
export function closeQuietly(...fds: number[]): void {
  for (const fd of fds) {
    try {
      sys.close(fd);
    } catch {
      // Already gone: nothing to release.
    }
  }
}

export { VhostUserError };
