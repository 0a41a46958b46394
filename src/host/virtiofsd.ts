/**
 * virtiofsd, the back end of a virtio-fs share: find it, start one per share with a sandbox
 * its privileges allow, connect to it over vhost-user and negotiate, stop it.
 *
 * Supported: the C virtiofsd of QEMU 7.x (Debian 12: /usr/lib/qemu/virtiofsd in the package
 * qemu-system-common). Facts measured with it (docs/virtiofs.md):
 * - `--fd=N` takes a listening socket; it accepts ONE connection, and exits when that
 *   connection closes (so tskvm's death ends it: see helper-process.ts). No pid file is
 *   written with --fd (with --socket-path it writes one under /var/run, root only).
 * - It sets up its sandbox AFTER accepting: a sandbox it may not create shows as the
 *   connection closing during the handshake, with the reason on its stderr.
 * - `-o sandbox=namespace` (default) needs CAP_SYS_ADMIN (mount, pid, net namespaces and
 *   pivot_root); `-o sandbox=chroot` needs CAP_SYS_CHROOT. As an ordinary user both work
 *   inside a user namespace (util-linux `unshare --user --map-root-user`): files the guest
 *   creates belong to the user; the guest sees the user's files as root's.
 * - It has no read-only option. tskvm enforces read-only shares on the host: virtiofsd runs
 *   in a mount namespace of its own where the shared directory is a read-only bind mount
 *   (so even a guest that remounts the share read-write gets EROFS).
 * - It serves one request queue (a second one makes it exit): num_request_queues is 1.
 * - Without a thread pool (--thread-pool-size=0, its default) it answers each queue's
 *   requests in the order they were made available: checked by the host tests.
 */
import { accessSync, constants as fsConstants, readFileSync, statSync } from "node:fs";
import { VhostUserChannel } from "./vhost-user/channel";
import { VhostUserFrontend, type BackendInfo } from "./vhost-user/frontend";
import { VhostUserError, bit } from "./vhost-user/protocol";
import { listenConnected } from "./vhost-user/listener";
import { HelperError, type HelperExit, HelperProcess, describeExit } from "./helper-process";
import * as sys from "../sys/libc";

/** The Debian package that ships the supported virtiofsd. */
export const VIRTIOFSD_PACKAGE = "qemu-system-common";

/** Where distributions install virtiofsd; $TSKVM_VIRTIOFSD overrides. */
export const VIRTIOFSD_PATHS = ["/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/virtiofsd"] as const;

/** Why a share cannot be served, with whose problem it is (the CLI's exit status follows). */
export class VirtiofsdError extends Error {
  constructor(
    /** "input": the share itself (missing, unreadable directory); "host": virtiofsd or privileges. */
    readonly failure: "input" | "host",
    message: string,
  ) {
    super(message);
    this.name = "VirtiofsdError";
  }
}

export interface Share {
  /** Absolute path of the host directory. */
  hostPath: string;
  /** The virtio-fs tag the guest mounts it by. */
  tag: string;
  readOnly: boolean;
}

export type CacheMode = "auto" | "always" | "none";

export interface StartOptions {
  /** A private directory for the socket (helper-process.ts createRuntimeDir). */
  runtimeDir: string;
  /** Distinguishes the sockets of several shares in one directory. */
  index: number;
  cache?: CacheMode;
  /** Deadline for virtiofsd's answers (ms). */
  timeoutMs?: number;
  /** Override the binary (tests); default: findVirtiofsd(). */
  binary?: string;
}

export function findVirtiofsd(): string | undefined {
  const override = process.env.TSKVM_VIRTIOFSD;
  if (override !== undefined && override !== "") return override;
  return VIRTIOFSD_PATHS.find((p) => isExecutable(p));
}

function isExecutable(path: string): boolean {
  try {
    accessSync(path, fsConstants.X_OK);
    return statSync(path).isFile();
  } catch {
    return false;
  }
}

export function requireVirtiofsd(): string {
  const found = findVirtiofsd();
  if (found === undefined) {
    throw new VirtiofsdError(
      "host",
      `virtiofsd is not installed (looked for ${VIRTIOFSD_PATHS.join(", ")}): install the Debian package ${VIRTIOFSD_PACKAGE} (apt-get install ${VIRTIOFSD_PACKAGE}), or set TSKVM_VIRTIOFSD`,
    );
  }
  if (!isExecutable(found)) {
    throw new VirtiofsdError("host", `TSKVM_VIRTIOFSD=${found} is not an executable file (virtiofsd comes with the Debian package ${VIRTIOFSD_PACKAGE})`);
  }
  return found;
}

/** The share directory must exist and be a directory this user can read and enter. */
export function checkShareDirectory(path: string): void {
  let st;
  try {
    st = statSync(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new VirtiofsdError("input", `cannot share ${path}: ${code === "ENOENT" ? "no such directory" : (e as Error).message}`);
  }
  if (!st.isDirectory()) throw new VirtiofsdError("input", `cannot share ${path}: not a directory`);
  try {
    accessSync(path, fsConstants.R_OK | fsConstants.X_OK);
  } catch {
    throw new VirtiofsdError("input", `cannot share ${path}: permission denied (it must be readable and searchable by you)`);
  }
}

const CAP_SYS_CHROOT = 18;
const CAP_SYS_ADMIN = 21;

/** This process's effective capabilities (from /proc/self/status). */
function effectiveCapabilities(): bigint {
  try {
    const m = /^CapEff:\s*([0-9a-f]+)$/m.exec(readFileSync("/proc/self/status", "utf8"));
    return m === null ? 0n : BigInt(`0x${m[1]}`);
  } catch {
    return 0n;
  }
}

export interface Sandbox {
  /** What runs virtiofsd: [] or a user-namespace wrapper. */
  prefix: string[];
  /** virtiofsd's -o sandbox= value. */
  mode: "namespace" | "chroot";
  /** Whether tskvm can give the share a read-only bind mount (needs a mount namespace). */
  readOnlyPossible: boolean;
  /** For messages. */
  description: string;
}

/**
 * The sandbox virtiofsd gets, by what this process may do: with CAP_SYS_ADMIN (root) its
 * own namespaces; with only CAP_SYS_CHROOT a chroot; otherwise (an ordinary user) a user
 * namespace in which it is root, and its namespaces inside that.
 */
export function chooseSandbox(caps = effectiveCapabilities()): Sandbox {
  if ((caps & bit(CAP_SYS_ADMIN)) !== 0n) {
    return { prefix: [], mode: "namespace", readOnlyPossible: true, description: "namespaces" };
  }
  if ((caps & bit(CAP_SYS_CHROOT)) !== 0n) {
    return { prefix: [], mode: "chroot", readOnlyPossible: false, description: "chroot" };
  }
  return {
    prefix: ["unshare", "--user", "--map-root-user"],
    mode: "namespace",
    readOnlyPossible: true,
    description: "a user namespace",
  };
}

/** Where a share of "/" is served from, inside virtiofsd's own mount namespace (virtiofsdCommand). */
const ROOT_SOURCE = "/tmp";
const ROOT_SCRIPT = `set -e; mount --rbind / ${ROOT_SOURCE}; exec "$@"`;
/**
 * Read-only: every mount of the copy made read-only, one by one: the copy at ROOT_SOURCE
 * (the last mount there in mountinfo) and its descendants by parent id, not what it covers
 * (mountinfo escapes spaces and such as \\NNN, which printf %b undoes).
 */
const ROOT_SCRIPT_READ_ONLY =
  `set -e; mount --rbind / ${ROOT_SOURCE}; ` +
  `awk -v m=${ROOT_SOURCE} 'NR == FNR { if ($5 == m) r = $1; next } $1 == r || ($2 in keep) { keep[$1] = 1; print $5 }' /proc/self/mountinfo /proc/self/mountinfo | ` +
  `while read -r m; do mount -o remount,bind,ro "$(printf '%b' "$m")"; done; exec "$@"`;

/** Escape a value for virtiofsd's -o option list (comma-separated, backslash escapes). */
export function escapeOption(value: string): string {
  return value.replace(/\\/g, "\\\\").replace(/,/g, "\\,");
}

/** The whole command line that starts virtiofsd for `share` with the listening socket as fd 3. */
export function virtiofsdCommand(binary: string, share: Share, sandbox: Sandbox, cache: CacheMode): string[] {
  // virtiofsd cannot serve the root itself: its sandbox bind-mounts the source onto itself
  // and pivot_roots into it, which the kernel refuses (EBUSY) when the source is the
  // process's own root. So "/" (--rootfs host) is bind-mounted, with what is mounted below
  // it, onto /tmp in a mount namespace of virtiofsd's own, and served from there.
  const whole = share.hostPath === "/";
  const source = whole ? ROOT_SOURCE : share.hostPath;
  const mountNs = sandbox.prefix.length > 0 ? [...sandbox.prefix, "--mount"] : ["unshare", "--mount", "--propagation", "private"];
  const daemon = [
    binary,
    "--fd=3",
    "-o", `source=${escapeOption(source)}`,
    "-o", `sandbox=${sandbox.mode}`,
    "-o", `cache=${cache}`,
    "-o", "log_level=warn",
    // No thread pool: each queue's thread answers its requests in the order it took them,
    // so when virtiofsd dies the unanswered ones are known from the rings
    // (devices/virtio/fs/in-flight.ts). (Also its default; said here because we rely on it.)
    "--thread-pool-size=0",
  ];
  if (whole) return [...mountNs, "/bin/sh", "-c", share.readOnly ? ROOT_SCRIPT_READ_ONLY : ROOT_SCRIPT, "sh", ...daemon];
  if (!share.readOnly) return [...sandbox.prefix, ...daemon];
  // A read-only bind mount of the share over itself in a mount namespace of virtiofsd's
  // own; virtiofsd's sandbox bind-mounts it again, which keeps it read-only. The path is an
  // argument of sh, never part of its script.
  return [...mountNs, "/bin/sh", "-c", 'mount --bind -o ro -- "$1" "$1" && shift && exec "$@"', "sh", share.hostPath, ...daemon];
}

export interface Virtiofsd {
  readonly share: Share;
  readonly process: HelperProcess;
  readonly frontend: VhostUserFrontend;
  readonly backend: BackendInfo;
  /** Close the connection (virtiofsd then exits on its own) and make sure it is gone. */
  stop(): Promise<HelperExit>;
}

/**
 * Start virtiofsd for `share` and negotiate with it. Throws VirtiofsdError with one line
 * for the user when it is missing, may not run here, or fails; nothing is left running then.
 */
export async function startVirtiofsd(share: Share, opts: StartOptions): Promise<Virtiofsd> {
  const binary = opts.binary ?? requireVirtiofsd();
  checkShareDirectory(share.hostPath);
  const sandbox = chooseSandbox();
  if (share.readOnly && !sandbox.readOnlyPossible) {
    throw new VirtiofsdError(
      "host",
      `cannot share ${share.hostPath} read-only: that needs a mount namespace (CAP_SYS_ADMIN, or an ordinary user with user namespaces), and this process has only CAP_SYS_CHROOT`,
    );
  }
  const name = `virtiofsd for ${share.hostPath}`;
  const { listenFd, connFd } = listenConnected(opts.runtimeDir, `virtiofsd-${opts.index}.sock`);
  const [command, ...args] = virtiofsdCommand(binary, share, sandbox, opts.cache ?? "auto");
  let helper: HelperProcess;
  try {
    // Ready at once: the connection is already made; the handshake below is the real check.
    helper = await HelperProcess.start({ name, command: command!, args, passFds: [listenFd], ready: () => true });
  } catch (e) {
    sys.close(connFd);
    if (e instanceof HelperError) throw new VirtiofsdError("host", `${name} cannot start: ${e.message}`);
    throw e;
  } finally {
    // virtiofsd has its own copy now; ours would keep the socket alive after it exits.
    sys.close(listenFd);
  }
  const frontend = new VhostUserFrontend(new VhostUserChannel(connFd, { ...(opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {}), peer: name }));
  const stop = async (): Promise<HelperExit> => {
    frontend.close();
    // Closing the connection is what ends virtiofsd; the signals are for one that hangs.
    if (await helper.waitExit(2000)) return helper.exited;
    return helper.stop();
  };
  let backend: BackendInfo;
  try {
    backend = frontend.handshake();
    if ((backend.features & bit(32)) === 0n) {
      throw new VirtiofsdError("host", `${name} does not offer virtio 1.0 (features 0x${backend.features.toString(16)})`);
    }
    if (backend.queueCount !== undefined && backend.queueCount < 2) {
      throw new VirtiofsdError("host", `${name} serves ${backend.queueCount} queue; virtio-fs needs 2 (hiprio and a request queue)`);
    }
  } catch (e) {
    const exit = (await helper.waitExit(2000)) ? await helper.exited : undefined;
    await stop();
    // Its last words may still be in the pipe when the exit is reported.
    await new Promise((r) => setTimeout(r, 50));
    if (e instanceof VhostUserError) throw startFailure(share, sandbox, helper, exit, e);
    throw e;
  }
  return { share, process: helper, frontend, backend, stop };
}

function startFailure(share: Share, sandbox: Sandbox, helper: HelperProcess, exit: HelperExit | undefined, e: VhostUserError): VirtiofsdError {
  const said = helper.outputTail().split("\n").map((l) => l.trim()).filter((l) => l !== "").slice(-2).join("; ");
  const how = exit !== undefined ? describeExit(exit) : e.message;
  const detail = said !== "" ? `${how}: ${said}` : how;
  if (/Operation not permitted|EPERM/.test(said)) {
    const need = sandbox.prefix.length > 0
      ? "run as root, or allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0; on Ubuntu also kernel.apparmor_restrict_unprivileged_userns=0)"
      : "it needs CAP_SYS_ADMIN for its namespace sandbox (or CAP_SYS_CHROOT for a chroot)";
    return new VirtiofsdError("host", `virtiofsd for ${share.hostPath} may not sandbox itself (${sandbox.description}): ${need} (${detail})`);
  }
  return new VirtiofsdError("host", `virtiofsd for ${share.hostPath} failed to start (${detail})`);
}

