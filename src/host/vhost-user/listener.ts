/**
 * How tskvm hands a vhost-user back end (virtiofsd --fd=N) its connection: a UNIX socket
 * listening in a private directory, with tskvm's end ALREADY connected to it before the
 * back end starts, and the path unlinked at once.
 *
 * - The back end's only possible peer is tskvm: nobody else could reach the 0700 directory,
 *   and the path existed for microseconds.
 * - Nothing is left on disk whatever happens next, and the connection is the lifeline: the
 *   kernel closes tskvm's end when tskvm dies in any way (SIGKILL included), and virtiofsd
 *   exits when its connection closes, even one it had not yet accepted (measured: within
 *   about a millisecond).
 */
import { unlinkSync } from "node:fs";
import { join } from "node:path";
import * as sys from "../../sys/libc";
import { connect, listen, unixAddress } from "../../sys/socket";

export interface ConnectedListener {
  /** The listening socket: pass it to the back end, then close this copy. */
  listenFd: number;
  /** tskvm's end, connected (queued on listenFd until the back end accepts). */
  connFd: number;
}

/** Both fds close-on-exec; `dir` must be private to this user (a RuntimeDir). */
export function listenConnected(dir: string, name: string): ConnectedListener {
  const path = join(dir, name);
  const listenFd = sys.socket(sys.AF_UNIX, sys.SOCK_STREAM);
  let connFd = -1;
  try {
    sys.bind(listenFd, unixAddress(path));
    try {
      listen(listenFd, 1);
      connFd = sys.socket(sys.AF_UNIX, sys.SOCK_STREAM);
      connect(connFd, unixAddress(path));
    } finally {
      unlinkSync(path);
    }
    return { listenFd, connFd };
  } catch (e) {
    if (connFd >= 0) sys.close(connFd);
    sys.close(listenFd);
    throw e;
  }
}
