/**
 * User-mode networking through passt (https://passt.top, Debian package `passt`): a
 * separate, sandboxed process that gives the guest DHCP, ARP (and NDP/DHCPv6) and maps its
 * connections to ordinary sockets of the host, with port forwarding into the guest. No
 * privileges needed, and the guest's packets are parsed there, never in tskvm.
 *
 * tskvm makes a connected UNIX stream socketpair, starts `passt --foreground --fd 3` with
 * one end (so there is no socket file, and passt quits as soon as the other end closes:
 * when tskvm stops it, and when tskvm dies, SIGKILL included), and keeps the other end for
 * the virtio-net back end (NetStream, net-stream.ts). passt writes its pid file once it has
 * bound the forwarded ports: that is the sign it started. Its runtime directory (the pid
 * file) is removed right after, so nothing is left on disk whatever happens later.
 *
 * passt takes the guest's address, netmask and gateway from the host interface that has
 * the default route (it copies them; the guest sees the host's own address), so it fails
 * to start on a host without one. Connections from the guest to the gateway's address reach
 * the host's loopback (127.0.0.1); forwarded host ports reach the guest's ports.
 */
import { createServer, isIPv4, type AddressInfo } from "node:net";
import { createSocket } from "node:dgram";
import * as fs from "node:fs";
import * as sys from "../sys/libc";
import { HelperError, HelperProcess, createRuntimeDir, describeExit, findExecutable, type HelperExit } from "./helper-process";

/** The Debian/Ubuntu package that has it. */
export const PASST_PACKAGE = "passt";

export type PortProtocol = "tcp" | "udp";

/** A host port forwarded into the guest. */
export interface PortForward {
  protocol: PortProtocol;
  /** The host address passt listens on: 127.0.0.1 unless one was given. */
  hostAddress: string;
  hostPort: number;
  guestPort: number;
}

/** Listen on loopback only unless told otherwise: a guest's SSH is nobody else's business. */
export const DEFAULT_FORWARD_ADDRESS = "127.0.0.1";

/** The guest's SSH port, forwarded from a free host port unless a forward already targets it. */
export const GUEST_SSH_PORT = 22;

export type PasstErrorKind =
  /** passt is not installed. */
  | "NotInstalled"
  /** A forward that cannot be: malformed, a duplicate, an address not on this host. */
  | "BadForward"
  /** A forwarded host port is taken. */
  | "PortInUse"
  /** A forwarded host port is below the unprivileged limit (usually 1024). */
  | "PortPrivileged"
  /** No host interface with a default route: passt cannot configure the guest. */
  | "NoRoute"
  /** passt failed some other way (its own message quoted). */
  | "Failed";

/** A passt problem, as one line that says what to do. */
export class PasstError extends Error {
  constructor(
    readonly kind: PasstErrorKind,
    message: string,
    /** The forward it is about, when it is about one. */
    readonly forward?: PortForward,
  ) {
    super(message);
    this.name = "PasstError";
  }
}

const PORT = /^\d{1,5}$/;

/**
 * "tcp:HOST_PORT:GUEST_PORT" or "udp:...", with an optional host address before the
 * host port: "tcp:0.0.0.0:8080:80". Throws PasstError("BadForward").
 */
export function parseForward(text: string): PortForward {
  const bad = (why: string) =>
    new PasstError("BadForward", `port forward "${text}" ${why} (expected tcp:HOST_PORT:GUEST_PORT or udp:HOST_PORT:GUEST_PORT, e.g. tcp:8080:80)`);
  const parts = text.split(":");
  const protocol = parts[0];
  if (protocol !== "tcp" && protocol !== "udp") throw bad(`does not start with "tcp:" or "udp:"`);
  let address = DEFAULT_FORWARD_ADDRESS;
  let ports: string[];
  if (parts.length === 3) ports = parts.slice(1);
  else if (parts.length === 4) {
    address = parts[1]!;
    if (isIPv4(address) === false) throw bad(`has "${address}" where an IPv4 host address or nothing belongs`);
    ports = parts.slice(2);
  } else throw bad("is not protocol, host port and guest port separated by colons");
  const [host, guest] = ports.map((p) => (PORT.test(p) ? Number(p) : NaN));
  for (const [name, value, raw] of [
    ["host port", host!, ports[0]!],
    ["guest port", guest!, ports[1]!],
  ] as const) {
    if (!Number.isInteger(value) || value < 1 || value > 65535) throw bad(`has ${name} "${raw}", not a number from 1 to 65535`);
  }
  return { protocol, hostAddress: address, hostPort: host!, guestPort: guest! };
}

/** "tcp:127.0.0.1:2222:22" */
export function formatForward(f: PortForward): string {
  return `${f.protocol}:${f.hostAddress}:${f.hostPort}:${f.guestPort}`;
}

/** Two forwards of one host port and protocol cannot both be (passt refuses them too). */
export function checkForwards(forwards: readonly PortForward[]): void {
  const seen = new Map<string, PortForward>();
  for (const f of forwards) {
    const key = `${f.protocol}:${f.hostPort}`;
    const other = seen.get(key);
    if (other !== undefined) {
      throw new PasstError("BadForward", `host port ${f.hostPort} (${f.protocol}) is forwarded twice (${formatForward(other)} and ${formatForward(f)})`);
    }
    seen.set(key, f);
  }
}

/**
 * Can this process listen on the forward's host port? Binds and closes it (passt binds it
 * for real a moment later). Throws PasstError("PortInUse" | "PortPrivileged" | "BadForward").
 */
export async function checkHostPort(f: PortForward): Promise<void> {
  const what = `host port ${f.hostPort} (${f.protocol} on ${f.hostAddress})`;
  try {
    if (f.protocol === "tcp") {
      await new Promise<void>((resolve, reject) => {
        const s = createServer();
        s.once("error", reject);
        s.listen({ port: f.hostPort, host: f.hostAddress, exclusive: true }, () => s.close(() => resolve()));
      });
    } else {
      await new Promise<void>((resolve, reject) => {
        const s = createSocket({ type: "udp4" });
        s.once("error", (e) => {
          s.close();
          reject(e);
        });
        s.bind({ port: f.hostPort, address: f.hostAddress, exclusive: true }, () => s.close(() => resolve()));
      });
    }
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === "EADDRINUSE") throw new PasstError("PortInUse", `${what} is already in use: pick another host port`, f);
    if (code === "EACCES" || code === "EPERM") {
      throw new PasstError(
        "PortPrivileged",
        `${what} is below ${unprivilegedPortStart()} and binding it needs privileges (root, CAP_NET_BIND_SERVICE or sysctl net.ipv4.ip_unprivileged_port_start): pick a higher host port`,
        f,
      );
    }
    if (code === "EADDRNOTAVAIL") throw new PasstError("BadForward", `${what}: ${f.hostAddress} is not an address of this host`, f);
    throw new PasstError("Failed", `${what}: ${(e as Error).message}`, f);
  }
}

function unprivilegedPortStart(): number {
  try {
    return Number(fs.readFileSync("/proc/sys/net/ipv4/ip_unprivileged_port_start", "utf8").trim());
  } catch {
    return 1024;
  }
}

/** A TCP port on 127.0.0.1 that nobody listens on right now. */
export async function freeLoopbackPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen({ port: 0, host: DEFAULT_FORWARD_ADDRESS, exclusive: true }, () => {
      const port = (s.address() as AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

export interface PasstOptions {
  forwards?: readonly PortForward[];
  /** Forward a free port of 127.0.0.1 to the guest's SSH unless a TCP forward targets guest port 22 (default true). */
  sshForward?: boolean;
  /** The passt executable (default "passt" from PATH). */
  command?: string;
  /** Default 10 s. */
  readyTimeoutMs?: number;
}

/** Who passt runs as when tskvm runs as root: "nobody" (passt's own default, here by number). */
const PASST_ROOT_RUNAS = 65534;

/** Attempts at the automatic SSH forward, each with a fresh free port (another process may take one first). */
const SSH_PORT_ATTEMPTS = 3;

/** A running passt and tskvm's end of its socket. */
export class Passt {
  private closed = false;

  private constructor(
    private readonly helper: HelperProcess,
    /** tskvm's end of the socket: non-blocking, close-on-exec; closed by stop(). */
    readonly fd: number,
    /** Every forward in effect, the automatic SSH one included. */
    readonly forwards: readonly PortForward[],
    /** The host port (on 127.0.0.1 unless the user chose) that reaches the guest's SSH, if any. */
    readonly sshPort: number | undefined,
  ) {}

  /** Start passt; throws PasstError. */
  static async start(options: PasstOptions = {}): Promise<Passt> {
    const command = options.command ?? "passt";
    const path = requirePasst(command);
    const forwards = [...(options.forwards ?? [])];
    checkForwards(forwards);
    for (const f of forwards) await checkHostPort(f);
    const userSsh = forwards.find((f) => f.protocol === "tcp" && f.guestPort === GUEST_SSH_PORT);
    const autoSsh = (options.sshForward ?? true) && userSsh === undefined;
    for (let attempt = 1; ; attempt++) {
      const all = [...forwards];
      if (autoSsh) {
        all.push({ protocol: "tcp", hostAddress: DEFAULT_FORWARD_ADDRESS, hostPort: await freeLoopbackPort(), guestPort: GUEST_SSH_PORT });
        checkForwards(all);
      }
      try {
        return await Passt.startOnce(path, all, options.readyTimeoutMs, autoSsh ? all[all.length - 1]!.hostPort : userSsh?.hostPort);
      } catch (e) {
        // Lost the race for the automatic SSH port: try another.
        const lostAutoPort = autoSsh && e instanceof PasstError && e.kind === "PortInUse" && e.forward === all[all.length - 1];
        if (!lostAutoPort || attempt >= SSH_PORT_ATTEMPTS) throw e;
      }
    }
  }

  private static async startOnce(path: string, forwards: PortForward[], readyTimeoutMs: number | undefined, sshPort: number | undefined): Promise<Passt> {
    const dir = createRuntimeDir("passt");
    const pidFile = dir.file("passt.pid");
    const [ours, theirs] = sys.socketpair(sys.AF_UNIX, sys.SOCK_STREAM);
    // No --log-file: as root passt opens it after giving up its capabilities, and could not
    // write into the runtime directory then. Its stderr (captured) has what it says.
    const args = ["--foreground", "--fd", "3", "--pid", pidFile, "--quiet"];
    if (process.getuid?.() === 0) {
      // As root passt switches to an unprivileged user before it writes its pid file: name
      // that user, and let it into the runtime directory.
      args.push("--runas", `${PASST_ROOT_RUNAS}:${PASST_ROOT_RUNAS}`);
      fs.chownSync(dir.path, PASST_ROOT_RUNAS, PASST_ROOT_RUNAS);
    }
    for (const f of forwards) args.push(f.protocol === "tcp" ? "-t" : "-u", `${f.hostAddress}/${f.hostPort}:${f.guestPort}`);
    let helper: HelperProcess;
    try {
      sys.fcntl(ours, sys.F_SETFL, sys.fcntl(ours, sys.F_GETFL) | sys.O_NONBLOCK);
      helper = await HelperProcess.start({
        name: "passt",
        command: path,
        args,
        passFds: [theirs],
        runtimeDir: dir,
        ready: () => fs.statSync(pidFile).size > 0,
        ...(readyTimeoutMs !== undefined ? { readyTimeoutMs } : {}),
        // Ends passt with tskvm even before it reads its socket (kept by the kernel only
        // while passt keeps its user id: as root, passt drops to "nobody" and relies on EOF).
        parentDeathSignal: "SIGKILL",
      });
    } catch (e) {
      sys.close(ours);
      throw e instanceof HelperError ? passtStartError(e, forwards) : e;
    } finally {
      sys.close(theirs);
      // Only start-up needed it; passt keeps its open log file.
      dir.remove();
    }
    return new Passt(helper, ours, forwards, sshPort);
  }

  get pid(): number {
    return this.helper.pid;
  }

  /** Resolves when passt has ended (`expected` false: it died while tskvm was using it). */
  get exited(): Promise<HelperExit> {
    return this.helper.exited;
  }

  get running(): boolean {
    return this.helper.running;
  }

  /** passt's last line of output (for a message when it exits with an error), or "". */
  lastLine(): string {
    return this.helper.lastLine();
  }

  /**
   * Close tskvm's end (passt then quits by itself) and wait for passt to end, signalling it
   * if it does not within `graceMs`. Call after the back end stopped using `fd`. Idempotent.
   */
  async stop(graceMs = 1000): Promise<void> {
    if (!this.closed) {
      this.closed = true;
      sys.close(this.fd);
    }
    // It quits by itself once its socket is closed; signals only if it does not.
    await this.helper.waitExit(graceMs);
    await this.helper.stop(graceMs);
  }
}

/** What passt's failure to start means, as a PasstError. */
function passtStartError(e: HelperError, forwards: readonly PortForward[]): PasstError {
  if (e.kind === "NotFound") return new PasstError("NotInstalled", e.message);
  const out = e.output;
  const bind = /Failed to bind any port for '-([tu]) ([^']*)'/.exec(out);
  if (bind !== null) {
    const spec = bind[2]!;
    const f = forwards.find((x) => (x.protocol === "tcp") === (bind[1] === "t") && spec === `${x.hostAddress}/${x.hostPort}:${x.guestPort}`);
    const what = f !== undefined ? `host port ${f.hostPort} (${f.protocol} on ${f.hostAddress}, forward ${formatForward(f)})` : `the forward "${spec}"`;
    return new PasstError("PortInUse", `passt could not listen on ${what}: it is in use or needs privileges: pick another host port`, f);
  }
  if (/Couldn't create user namespace/.test(out)) {
    return new PasstError(
      "Failed",
      "passt cannot sandbox itself: creating a user namespace is not permitted here (a chroot, or user namespaces turned off: kernel.unprivileged_userns_clone, user.max_user_namespaces)",
    );
  }
  if (/External interface not usable/.test(out)) return noRouteError();
  const line = lastMeaningfulLine(out);
  const how = e.exit !== undefined ? `${describeExit(e.exit)} at start-up` : `was not ready in time`;
  return new PasstError("Failed", `passt ${how}${line === "" ? "" : `: ${line}`}`);
}

/** passt's path; throws PasstError "NotInstalled" with the package to install. */
export function requirePasst(command = "passt"): string {
  const path = findExecutable(command);
  if (path === undefined) {
    throw new PasstError(
      "NotInstalled",
      `user-mode networking needs passt, which is not installed: install the package "${PASST_PACKAGE}" (e.g. apt-get install ${PASST_PACKAGE})`,
    );
  }
  return path;
}

/**
 * What passt needs of this host that can be seen without starting it, checked before any
 * long work: passt installed, and a default route (IPv4 or IPv6) to copy the guest's
 * addressing from. Throws PasstError; passt's own start still reports what this misses.
 */
export function checkPasstHost(command = "passt"): void {
  requirePasst(command);
  if (!hasDefaultRoute()) throw noRouteError();
}

function noRouteError(): PasstError {
  return new PasstError(
    "NoRoute",
    "passt found no host network interface with a default route (it takes the guest's address and gateway from it): add a default route, e.g. on a dummy interface",
  );
}

/** A default route in this network namespace: /proc/net/route (IPv4) or /proc/net/ipv6_route. */
function hasDefaultRoute(): boolean {
  const read = (path: string): string | undefined => {
    try {
      return fs.readFileSync(path, "latin1");
    } catch {
      return undefined;
    }
  };
  const v4 = read("/proc/net/route");
  const v6 = read("/proc/net/ipv6_route");
  // Cannot tell (no /proc): let passt decide.
  if (v4 === undefined && v6 === undefined) return true;
  // Iface Destination Gateway Flags ... Mask: destination and mask 0, flag RTF_UP (1).
  const v4Default = (v4 ?? "").split("\n").slice(1).some((l) => {
    const f = l.trim().split(/\s+/);
    return f.length >= 8 && f[1] === "00000000" && f[7] === "00000000" && (parseInt(f[3]!, 16) & 1) === 1;
  });
  // dest prefix-length ... : ::/0, not the unreachable route the kernel lists on lo.
  const v6Default = (v6 ?? "").split("\n").some((l) => {
    const f = l.trim().split(/\s+/);
    return f.length >= 10 && /^0{32}$/.test(f[0]!) && f[1] === "00" && f[9] !== "lo";
  });
  return v4Default || v6Default;
}

/** passt's last line that is not a syslog complaint or a timestamp-only prefix. */
function lastMeaningfulLine(out: string): string {
  const lines = out
    .split("\n")
    .map((l) => l.replace(/^\d+\.\d+:\s+(ERROR|WARNING|info):\s+/, "").trim())
    .filter((l) => l !== "" && !/^Failed to send \d+ bytes to syslog/.test(l));
  return lines[lines.length - 1] ?? "";
}
