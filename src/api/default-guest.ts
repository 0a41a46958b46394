/**
 * The default guest (guest/build.sh): a small Linux kernel and a busybox initrd built from
 * Debian packages and cached under ~/.cache/tskvm, keyed by a hash of the build's inputs.
 */
import { spawn, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join, resolve } from "node:path";

export interface GuestManifest {
  /** Compressed bzImage. */
  kernel: string;
  /** Uncompressed ELF vmlinux (PVH entry): boots much faster on an emulating KVM. */
  vmlinux: string;
  initrd: string;
  /** The same initrd uncompressed: an emulating KVM spends ~55 s gunzipping the other. */
  initrdUncompressed?: string;
  /** Private SSH key whose public half the initrd authorises for root (OpenSSH format). */
  sshKey?: string;
  /** The same key in dropbear's format, for dbclient. */
  sshKeyDropbear?: string;
  hash: string;
  /** The command line the guest build recommends. */
  cmdline?: string;
}

export class GuestBuildError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "GuestBuildError";
  }
}

/** guest/build.sh in this package (dist/src/api -> package root). */
export function guestBuildScript(): string {
  return resolve(__dirname, "..", "..", "..", "guest", "build.sh");
}

function parseManifest(stdout: string): GuestManifest {
  const last = stdout.trim().split("\n").pop() ?? "";
  const m = JSON.parse(last) as GuestManifest;
  for (const key of ["kernel", "vmlinux", "initrd"] as const) {
    if (typeof m[key] !== "string" || !existsSync(m[key])) {
      throw new GuestBuildError(`guest build manifest names a missing ${key}: ${String(m[key])}`);
    }
  }
  return m;
}

/** The cached default guest, or undefined when it has not been built for these inputs. */
export function findDefaultGuest(): GuestManifest | undefined {
  const script = guestBuildScript();
  if (!existsSync(script)) return undefined;
  const r = spawnSync("bash", [script, "--print"], { encoding: "utf8" });
  if (r.status !== 0) return undefined;
  try {
    return parseManifest(r.stdout);
  } catch {
    return undefined;
  }
}

/** Build (or find) the default guest; build progress goes to our stderr. */
export function buildDefaultGuest(): GuestManifest {
  const script = guestBuildScript();
  if (!existsSync(script)) {
    throw new GuestBuildError(`the guest build script ${script} is missing; give a kernel with -k`);
  }
  const r = spawnSync("bash", [script], { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] });
  if (r.status !== 0) {
    throw new GuestBuildError(
      `building the default guest failed (bash ${script} exited ${r.status ?? r.signal}); see its output above, or give a kernel with -k`,
    );
  }
  return parseManifest(r.stdout);
}

/**
 * buildDefaultGuest without blocking the event loop, so that `signal` can stop it: the
 * build runs in a process group of its own, and all of it (make, the compilers) gets
 * SIGTERM; build.sh removes its temporary files. Rejects with GuestBuildError.
 */
export async function buildDefaultGuestAsync(signal?: AbortSignal): Promise<GuestManifest> {
  const script = guestBuildScript();
  if (!existsSync(script)) {
    throw new GuestBuildError(`the guest build script ${script} is missing; give a kernel with -k`);
  }
  if (signal?.aborted) throw new GuestBuildError("the default guest build was stopped");
  const child = spawn("bash", [script], { stdio: ["ignore", "pipe", "inherit"], detached: true });
  const onAbort = () => {
    try {
      process.kill(-child.pid!, "SIGTERM");
    } catch {
      // Already gone.
    }
  };
  signal?.addEventListener("abort", onAbort, { once: true });
  let out = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
  const [code, sig] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => {
    child.on("error", () => resolve([null, null]));
    child.on("close", (c, s) => resolve([c, s]));
  });
  signal?.removeEventListener("abort", onAbort);
  if (signal?.aborted) throw new GuestBuildError("the default guest build was stopped");
  if (code !== 0) {
    throw new GuestBuildError(
      `building the default guest failed (bash ${script} exited ${code ?? sig}); see its output above, or give a kernel with -k`,
    );
  }
  return parseManifest(out);
}

/** The kernel and initrd that boot fastest on this kind of host. */
export function bootFilesFor(guest: GuestManifest, emulatedHost: boolean): { kernel: string; initrd: string } {
  // An emulating KVM interprets the kernel's own decompressors: skip both of them there.
  if (emulatedHost) return { kernel: guest.vmlinux, initrd: guest.initrdUncompressed ?? guest.initrd };
  return { kernel: guest.kernel, initrd: guest.initrd };
}

export function defaultGuestCacheDir(): string {
  const base = process.env.XDG_CACHE_HOME ?? join(process.env.HOME ?? "/root", ".cache");
  return join(base, "tskvm", "guest");
}
