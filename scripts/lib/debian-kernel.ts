/**
 * The stock Debian kernel (guest/debian-kernel.sh): an unmodified linux-image package,
 * unpacked and indexed in ~/.cache/tskvm/debian-kernel/<hash>/. The harness VM runs on it
 * and the Linux tier boots it as a distribution kernel.
 */
import { spawn, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { repoRoot } from "./native";

export interface DebianKernel {
  package: string;
  version: string;
  /** "6.1.0-57-amd64" */
  release: string;
  /** The bzImage, as Debian ships it. */
  vmlinuz: string;
  /** lib/modules/RELEASE, with depmod's index. */
  modules: string;
  hash: string;
}

export class DebianKernelError extends Error {}

const script = () => join(repoRoot(), "guest", "debian-kernel.sh");

function parse(stdout: string): DebianKernel {
  const k = JSON.parse(stdout.trim().split("\n").pop() ?? "") as DebianKernel;
  if (!existsSync(k.vmlinuz) || !existsSync(k.modules)) throw new DebianKernelError(`guest/debian-kernel.sh names missing files: ${k.vmlinuz}`);
  return k;
}

/** The cached kernel, or undefined when it has not been fetched (never downloads). */
export function findDebianKernel(): DebianKernel | undefined {
  const r = spawnSync("bash", [script(), "--print"], { encoding: "utf8" });
  if (r.status !== 0) return undefined;
  try {
    return parse(r.stdout);
  } catch {
    return undefined;
  }
}

/** The pinned package's name (for messages). */
export function debianKernelPackage(): string {
  return spawnSync("bash", [script(), "--package"], { encoding: "utf8" }).stdout.trim() || "the pinned linux-image package";
}

/**
 * Fetch (apt-get download) and unpack the kernel unless cached. Rejects with the script's
 * one-line reason (no such package in apt's lists, no depmod, ...).
 */
export async function fetchDebianKernel(signal?: AbortSignal): Promise<DebianKernel> {
  const child = spawn("bash", [script()], { stdio: ["ignore", "pipe", "pipe"], ...(signal !== undefined ? { signal } : {}) });
  let out = "";
  let err = "";
  child.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
  child.stderr.setEncoding("utf8").on("data", (d: string) => (err += d));
  const code = await new Promise<number | null>((resolve) => {
    child.on("error", () => undefined);
    child.on("close", (c) => resolve(c));
  });
  if (code !== 0) {
    const line = err.trim().split("\n").filter((l) => l.startsWith("debian-kernel:")).pop() ?? err.trim().split("\n").pop() ?? "";
    throw new DebianKernelError(line.replace(/^debian-kernel: /, "") || `guest/debian-kernel.sh exited with status ${code}`);
  }
  return parse(out);
}
