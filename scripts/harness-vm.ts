/**
 * The harness VM: run a command inside a QEMU VM whose CPU is emulated in software (TCG,
 * `-cpu max`: AMD with SVM and nested paging), so that it has a /dev/kvm with hardware
 * semantics (kvm_amd) whatever this host has: no /dev/kvm at all, or an emulating kvm-pvm
 * on which stock kernels cannot run. tskvm's KVM and Linux tiers run there (scripts/test.ts).
 *
 *   node dist/scripts/harness-vm.js [options] -- COMMAND [ARG...]     (npm run harness -- ...)
 *
 * Inside: the pinned Debian kernel (guest/debian-kernel.sh) and its own modules; this
 * host's root file system read-only over virtio-9p with a tmpfs overlay (writes are
 * thrown away), the directories named with --rw shared read-write; the command runs as
 * root in the same working directory, stdin /dev/null, its stdout and stderr streamed
 * here over two serial ports. Exit status: the command's; 124 --timeout; 125 the harness
 * or the VM failed (one line says why); 128+N this process got signal N. QEMU never
 * outlives the harness (it is stopped on a signal, and dies with us through PDEATHSIG).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync, realpathSync, statSync, openSync, readSync, closeSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Writable } from "node:stream";
import { buildInitramfs, appendInitramfs } from "../src/boot/initramfs";
import { moduleArchive } from "../src/boot/kernel-modules";
import { fetchDebianKernel, type DebianKernel } from "./lib/debian-kernel";
import { repoRoot } from "./lib/native";
import { catchStopSignals } from "./lib/stop";

/** Modules the VM's kernel loads: 9p and overlay for the root, KVM, and what tests build networks with. */
export const HARNESS_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay", "kvm_amd", "tun", "veth", "bridge", "loop"];

export const EXIT_TIMEOUT = 124;
export const EXIT_HARNESS = 125;

export interface HarnessOptions {
  command: readonly string[];
  /** Guest RAM, QEMU's syntax ("4G"). */
  memory?: string;
  cpus?: number;
  /** Host directories shared read-write at the same path. */
  rw?: readonly string[];
  /** Environment of the command (besides PATH, HOME, LANG, TERM). */
  env?: Readonly<Record<string, string>>;
  cwd?: string;
  timeoutMs?: number;
  /** The VM kernel's console log (default: a temp file, its tail printed when the VM fails). */
  consoleLog?: string;
  stdout?: Writable;
  stderr?: Writable;
  /** Progress lines ("starting QEMU ..."). */
  onProgress?: (line: string) => void;
  /** Stops the VM; the result's reason is then "aborted". */
  signal?: AbortSignal;
}

export interface HarnessResult {
  /** The command's exit status, or EXIT_TIMEOUT / EXIT_HARNESS. */
  status: number;
  reason: "exited" | "timeout" | "vm-failed" | "aborted";
  /** One line for "vm-failed", with the console's tail. */
  message?: string;
  /** VM start to end. */
  ms: number;
  kernel: DebianKernel;
}

/** A prerequisite is missing: one line that says which and how to get it. */
export class HarnessError extends Error {}

function findQemu(): string {
  const chosen = process.env.TSKVM_QEMU;
  if (chosen !== undefined && chosen !== "") {
    if (existsSync(chosen)) return chosen;
    throw new HarnessError(`TSKVM_QEMU=${chosen}: no such file (unset it to use qemu-system-x86_64 from PATH)`);
  }
  for (const dir of (process.env.PATH ?? "/usr/bin").split(":").concat(["/usr/bin", "/usr/local/bin"])) {
    const p = join(dir, "qemu-system-x86_64");
    if (existsSync(p)) return p;
  }
  throw new HarnessError("qemu-system-x86_64 not found: apt-get install qemu-system-x86");
}

/** True for an ELF executable without a program interpreter (statically linked). */
function isStaticElf(path: string): boolean {
  const fd = openSync(path, "r");
  try {
    const head = Buffer.alloc(64);
    if (readSync(fd, head, 0, 64, 0) < 64 || head.readUInt32BE(0) !== 0x7f454c46 || head[4] !== 2) return false;
    const phoff = Number(head.readBigUInt64LE(0x20));
    const phentsize = head.readUInt16LE(0x36);
    const phnum = head.readUInt16LE(0x38);
    const ph = Buffer.alloc(phentsize * phnum);
    readSync(fd, ph, 0, ph.byteLength, phoff);
    for (let i = 0; i < phnum; i++) if (ph.readUInt32LE(i * phentsize) === 3 /* PT_INTERP */) return false;
    return true;
  } finally {
    closeSync(fd);
  }
}

function findStaticBusybox(): string {
  for (const p of ["/bin/busybox", "/usr/bin/busybox"]) {
    if (existsSync(p) && isStaticElf(p)) return p;
  }
  throw new HarnessError("a statically linked busybox is needed for the VM's init: apt-get install busybox-static");
}

/** The VM's initramfs: busybox, /init, the modules. Uncompressed: TCG would spend seconds in gunzip. */
function harnessInitramfs(kernel: DebianKernel, busybox: string): Uint8Array {
  const init = readFileSync(join(repoRoot(), "scripts", "harness-vm-init.sh"));
  const base = buildInitramfs([
    { kind: "file", path: "bin/busybox", data: readFileSync(busybox), mode: 0o755 },
    { kind: "symlink", path: "bin/sh", target: "busybox" },
    { kind: "file", path: "init", data: init, mode: 0o755 },
    { kind: "dir", path: "dev" },
    { kind: "char", path: "dev/console", major: 5, minor: 1 },
    { kind: "dir", path: "proc" },
    { kind: "dir", path: "sys" },
  ]);
  const modules = moduleArchive(kernel.modules, HARNESS_MODULES, kernel.release);
  if (modules.plan.missing.length > 0) throw new HarnessError(`the kernel ${kernel.package} lacks the modules ${modules.plan.missing.join(", ")}`);
  return appendInitramfs(base, modules.archive);
}

const shQuote = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

/**
 * One KVM VM held open for the whole command. KVM flips static keys when the first VM is
 * created and the last destroyed (preempt notifiers: a branch inside __schedule), and Linux
 * patches such code with int3 and a cross-CPU sync. QEMU's multi-threaded TCG sometimes
 * leaves the other emulated CPU looping on the int3 (stale translated code), and the VM
 * hangs in kvm_destroy_vm's IPI (seen several times a day here: the console shows RCU
 * stalls with one CPU in asm_exc_int3 from __schedule). With a VM always open, the keys
 * never flip. python3 is there on every host the brief names; without it, nothing is held.
 */
const KVM_PIN =
  `if [ -c /dev/kvm ] && command -v python3 >/dev/null 2>&1; then ` +
  `python3 -c 'import os, fcntl, time; k = os.open("/dev/kvm", os.O_RDWR); fcntl.ioctl(k, 0xAE01, 0); time.sleep(1e9)' ` +
  `</dev/null >/dev/null 2>&1 & fi`;

function commandScript(o: HarnessOptions, cwd: string): string {
  const env: Record<string, string> = {
    PATH: process.env.PATH ?? "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
    HOME: process.env.HOME ?? "/root",
    LANG: "C.UTF-8",
    TERM: "dumb",
    ...o.env,
  };
  return [
    "# written by scripts/harness-vm.ts",
    ...Object.entries(env).map(([k, v]) => `export ${k}=${shQuote(v)}`),
    `cd ${shQuote(cwd)} || exit 125`,
    KVM_PIN,
    `exec ${o.command.map(shQuote).join(" ")}`,
    "",
  ].join("\n");
}

/** A one-connection unix socket server that forwards what QEMU's chardev sends to `out`. */
function serialSink(path: string, out: Writable): { server: Server; done: Promise<void> } {
  let resolveDone: () => void = () => undefined;
  const done = new Promise<void>((r) => (resolveDone = r));
  const server = createServer((socket: Socket) => {
    socket.on("data", (chunk) => out.write(chunk));
    socket.on("close", () => resolveDone());
    socket.on("error", () => resolveDone());
  });
  server.listen(path);
  return { server, done };
}

function tail(path: string, lines: number): string {
  try {
    return readFileSync(path, "latin1").replace(/\r/g, "").split("\n").filter((l) => l.trim() !== "").slice(-lines).join("\n");
  } catch {
    return "";
  }
}

/** Run a command in the harness VM. Rejects only with HarnessError (a prerequisite is missing). */
export async function runInHarnessVm(o: HarnessOptions): Promise<HarnessResult> {
  if (o.command.length === 0) throw new HarnessError("no command given");
  const rw = (o.rw ?? []).map((d) => {
    let real: string;
    try {
      real = realpathSync(d);
    } catch {
      throw new HarnessError(`--rw ${d}: no such directory`);
    }
    if (!statSync(real).isDirectory()) throw new HarnessError(`--rw ${d}: not a directory`);
    return real;
  });
  const qemu = findQemu();
  const busybox = findStaticBusybox();
  const progress = o.onProgress ?? (() => undefined);
  let kernel: DebianKernel;
  try {
    kernel = await fetchDebianKernel(o.signal);
  } catch (e) {
    if (o.signal?.aborted) throw new HarnessError("stopped while fetching the kernel");
    throw new HarnessError(`no kernel for the VM: ${(e as Error).message}`);
  }
  const cwd = o.cwd ?? process.cwd();
  const ctl = mkdtempSync(join(tmpdir(), "tskvm-harness-"));
  const started = Date.now();
  let child: ChildProcess | undefined;
  const servers: Server[] = [];
  try {
    writeFileSync(join(ctl, "cmd.sh"), commandScript(o, cwd));
    writeFileSync(join(ctl, "rw"), rw.map((d, i) => `rw${i} ${d}\n`).join(""));
    const initrd = join(ctl, "initramfs.cpio");
    writeFileSync(initrd, harnessInitramfs(kernel, busybox));
    const consoleLog = o.consoleLog ?? join(ctl, "console.log");
    const stdout = serialSink(join(ctl, "stdout.sock"), o.stdout ?? process.stdout);
    const stderr = serialSink(join(ctl, "stderr.sock"), o.stderr ?? process.stderr);
    servers.push(stdout.server, stderr.server);
    await Promise.all(servers.map((s) => new Promise((r) => (s.listening ? r(undefined) : s.once("listening", r)))));

    const virtfs = (path: string, tag: string, readonly: boolean) => [
      "-virtfs",
      `local,path=${path},mount_tag=${tag},security_model=none,multidevs=remap${readonly ? ",readonly=on" : ""}`,
    ];
    const qemuArgs = [
      "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none", "-vga", "none", "-nic", "none",
      "-machine", "pc", "-accel", "tcg,thread=multi,tb-size=512", "-cpu", "max",
      "-smp", String(o.cpus ?? 2), "-m", o.memory ?? "4G",
      "-kernel", kernel.vmlinuz, "-initrd", initrd,
      "-append", "console=ttyS0 panic=-1 oops=panic softlockup_panic=1 watchdog_thresh=60 sysctl.kernel.panic_on_rcu_stall=1 rcupdate.rcu_cpu_stall_timeout=60 mitigations=off tsc=reliable loglevel=5 rdinit=/init",
      "-serial", `file:${consoleLog}`,
      "-chardev", `socket,id=out,path=${join(ctl, "stdout.sock")}`, "-serial", "chardev:out",
      "-chardev", `socket,id=err,path=${join(ctl, "stderr.sock")}`, "-serial", "chardev:err",
      ...virtfs("/", "hostroot", true),
      ...virtfs(ctl, "ctl", false),
      ...rw.flatMap((d, i) => virtfs(d, `rw${i}`, false)),
    ];
    // PDEATHSIG: QEMU dies with this process even when it is killed outright.
    const setpriv = ["/usr/bin/setpriv", "/bin/setpriv"].find((p) => existsSync(p));
    const argv = setpriv !== undefined ? [setpriv, "--pdeathsig", "KILL", "--", qemu, ...qemuArgs] : [qemu, ...qemuArgs];
    progress(`starting QEMU (TCG, -cpu max, ${o.cpus ?? 2} vCPUs, ${o.memory ?? "4G"}) on ${kernel.package} ${kernel.version}`);
    const qemuErr: string[] = [];
    const proc = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "pipe", "pipe"] });
    child = proc;
    proc.stdout!.setEncoding("utf8").on("data", (d: string) => qemuErr.push(d));
    proc.stderr!.setEncoding("utf8").on("data", (d: string) => qemuErr.push(d));
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
      proc.on("error", (e) => {
        qemuErr.push(e.message);
        resolve({ code: null, signal: null });
      });
      proc.on("exit", (code, signal) => resolve({ code, signal }));
    });

    let stopReason: "timeout" | "aborted" | undefined;
    const stop = (why: "timeout" | "aborted") => {
      stopReason ??= why;
      proc.kill("SIGTERM");
      setTimeout(() => proc.kill("SIGKILL"), 10_000).unref();
    };
    const timer = o.timeoutMs !== undefined ? setTimeout(() => stop("timeout"), o.timeoutMs) : undefined;
    const onAbort = () => stop("aborted");
    if (o.signal?.aborted) onAbort();
    o.signal?.addEventListener("abort", onAbort);
    const end = await exited;
    if (timer !== undefined) clearTimeout(timer);
    o.signal?.removeEventListener("abort", onAbort);
    // Everything the guest sent before it powered off is in the sockets: wait for their end.
    await Promise.race([Promise.all([stdout.done, stderr.done]), new Promise((r) => setTimeout(r, 2000))]);
    const ms = Date.now() - started;
    if (stopReason === "aborted") return { status: EXIT_HARNESS, reason: "aborted", ms, kernel };
    if (stopReason === "timeout") {
      return { status: EXIT_TIMEOUT, reason: "timeout", ms, kernel, message: `timed out after ${Math.round(o.timeoutMs! / 1000)} s; the VM's console ended with:\n${tail(consoleLog, 20)}` };
    }
    const statusFile = join(ctl, "status");
    if (existsSync(statusFile)) {
      const status = Number(readFileSync(statusFile, "utf8").trim());
      if (Number.isInteger(status)) return { status, reason: "exited", ms, kernel };
    }
    const why = end.code !== null ? `QEMU exited with status ${end.code}` : end.signal !== null ? `QEMU was killed by ${end.signal}` : "QEMU did not start";
    const qemuSaid = qemuErr.join("").trim().split("\n").pop() ?? "";
    return {
      status: EXIT_HARNESS,
      reason: "vm-failed",
      ms,
      kernel,
      message: `the VM ended before the command reported its status (${why}${qemuSaid ? `: ${qemuSaid}` : ""}); its console ended with:\n${tail(consoleLog, 30)}`,
    };
  } finally {
    if (child !== undefined && child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    for (const s of servers) s.close();
    rmSync(ctl, { recursive: true, force: true });
  }
}

const USAGE = `usage: node dist/scripts/harness-vm.js [options] -- COMMAND [ARG...]
Runs COMMAND in a QEMU TCG VM with emulated AMD SVM (a /dev/kvm with hardware semantics),
this host's root read-only (tmpfs overlay), as root, in the current directory.
  -m, --memory SIZE   VM RAM (default 4G)
  -c, --cpus N        VM vCPUs (default 2)
  -w, --rw DIR        share DIR read-write at the same path (repeatable)
  -e, --env VAR=VAL   set VAR for the command (repeatable)
  -C, --cwd DIR       working directory inside (default: the current one)
  -t, --timeout S     stop the VM after S seconds (exit 124; default 3600)
      --console FILE  write the VM kernel's console log to FILE
  -v, --verbose       progress lines on stderr
Exit status: COMMAND's; 124 timeout; 125 the harness or the VM failed; 128+N signal N.
The kernel is the Debian package pinned in guest/debian-kernel.sh (fetched on first use);
TSKVM_QEMU names another qemu-system-x86_64.`;

async function main(argv: string[]): Promise<number> {
  const o: HarnessOptions & { env: Record<string, string>; rw: string[] } = { command: [], env: {}, rw: [], timeoutMs: 3600_000 };
  let verbose = false;
  let i = 0;
  const value = (flag: string) => {
    const v = argv[++i];
    if (v === undefined) throw new HarnessError(`${flag} needs a value`);
    return v;
  };
  for (; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === "--") {
      i++;
      break;
    }
    if (a === "-h" || a === "--help") {
      process.stdout.write(`${USAGE}\n`);
      return 0;
    } else if (a === "-m" || a === "--memory") o.memory = value(a);
    else if (a === "-c" || a === "--cpus") o.cpus = Number(value(a));
    else if (a === "-w" || a === "--rw") o.rw.push(value(a));
    else if (a === "-e" || a === "--env") {
      const [k, ...v] = value(a).split("=");
      if (!k || v.length === 0) throw new HarnessError(`${a} takes VAR=VALUE`);
      o.env[k] = v.join("=");
    } else if (a === "-C" || a === "--cwd") o.cwd = value(a);
    else if (a === "-t" || a === "--timeout") o.timeoutMs = Number(value(a)) * 1000;
    else if (a === "--console") o.consoleLog = value(a);
    else if (a === "-v" || a === "--verbose") verbose = true;
    else if (a.startsWith("-")) throw new HarnessError(`unknown option ${a} (--help)`);
    else break;
  }
  const command = argv.slice(i);
  if (command.length === 0) throw new HarnessError("no command given (harness-vm [options] -- COMMAND ...; --help)");
  if (o.cpus !== undefined && !(Number.isInteger(o.cpus) && o.cpus >= 1)) throw new HarnessError("--cpus takes a whole number >= 1");
  if (!(Number.isFinite(o.timeoutMs) && o.timeoutMs! > 0)) throw new HarnessError("--timeout takes seconds > 0");
  const stop = catchStopSignals();
  const t0 = Date.now();
  const stopped = () => {
    process.stderr.write(`harness-vm: stopped by ${stop.signal()}\n`);
    return stop.exitCode();
  };
  let r: HarnessResult;
  try {
    r = await runInHarnessVm({
      ...o,
      command,
      signal: stop.abort.signal,
      ...(verbose ? { onProgress: (l: string) => process.stderr.write(`harness-vm: ${l}\n`) } : {}),
    });
  } catch (e) {
    if (stop.signal() !== undefined) return stopped();
    throw e;
  }
  if (stop.signal() !== undefined) return stopped();
  if (r.message !== undefined) process.stderr.write(`harness-vm: ${r.message}\n`);
  if (verbose) process.stderr.write(`harness-vm: status ${r.status} after ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
  return r.status;
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (e: Error) => {
      process.stderr.write(`harness-vm: ${e instanceof HarnessError ? e.message : `internal error: ${e.stack ?? e.message}`}\n`);
      process.exit(EXIT_HARNESS);
    },
  );
}

/** True when QEMU is installed (for callers that explain what they skip). */
export function harnessAvailable(): string | undefined {
  try {
    findQemu();
    findStaticBusybox();
    return undefined;
  } catch (e) {
    return (e as Error).message;
  }
}
