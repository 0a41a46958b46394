/**
 * User-mode networking, end to end: TCP throughput both ways and the request/response rate
 * between the default guest and the host, for
 *
 *   tskvm   tskvm boot --net user (virtio-net over passt's socket)
 *   qemu    QEMU (virtio-net-pci, -netdev stream) on THE SAME passt: started the same way
 *           (Passt.start), its socket handed to QEMU as fd 3 (addr.type=fd)
 *   tap     tskvm on a TAP (--tap, --guest-ip): the privileged path, for scale
 *
 * in one run, each in turn, in network namespaces the benchmark makes (passt's needs an
 * uplink with a default route; nothing leaves them). The guest runs native/netbench.c (built
 * static, on a disk image) against the same program on the host side: on the namespace's
 * 127.0.0.1 (the guest reaches it at the gateway address, through passt) or on the TAP's
 * host address. Each figure is the guest's own measurement over `seconds`; the median over
 * rounds. Needs root (namespaces), /dev/kvm, passt, the default guest, dbclient; QEMU is
 * skipped with the reason when not installed.
 *
 * `node dist/scripts/bench-usernet.js [--seconds N] [--rounds N]` runs it standalone.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, copyFileSync, chmodSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { buildNative, repoRoot } from "./lib/native";
import { QEMU_EMULATED_CPU } from "./lib/qemu-cpu";
import { runStandalone } from "./lib/standalone";
import { bootFilesFor, findDefaultGuest } from "../src/api/default-guest";
import { detectHostKvm } from "../src/kvm/host";
import { makeDiskImage } from "../src/api/disk";
import { Passt } from "../src/host/passt";
import { findExecutable } from "../src/host/helper-process";
import { NetNs, netTestSkipReason } from "../test/helpers/netns";
import { addUplink, passtInNetns } from "../test/helpers/passt";

export interface UsernetRates {
  /** Guest -> host TCP, Mbit/s. */
  tx: number;
  /** Host -> guest TCP, Mbit/s. */
  rx: number;
  /** 1-byte request/response round trips per second. */
  rr: number;
}

export interface UsernetBenchResult {
  seconds: number;
  rounds: number;
  tskvm: UsernetRates;
  qemu: UsernetRates | string;
  tap: UsernetRates | string;
  /** tskvm / QEMU, per figure (target >= 1). */
  ratio: UsernetRates | undefined;
}

export interface UsernetBenchOptions {
  /** Seconds per figure (default 10). */
  seconds?: number;
  rounds?: number;
}

const PORT = 5999;
const GATEWAY = "10.0.2.2";
const TAP_HOST = "192.168.100.1";
const TAP_GUEST = "192.168.100.2";

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/** Why the benchmark cannot run here, or undefined. */
export function usernetBenchSkipReason(): string | undefined {
  if (!existsSync("/dev/kvm")) return "no /dev/kvm";
  const net = netTestSkipReason();
  if (net !== undefined) return net;
  if (findExecutable("passt") === undefined) return 'passt is not installed (Debian package "passt")';
  if (findExecutable("dbclient") === undefined) return "dbclient is not installed (Debian package dropbear-bin)";
  if (findDefaultGuest() === undefined) return "no default guest built (npm run guest)";
  return undefined;
}

/** A process whose stdout is watched for a pattern. */
class Watched {
  out = "";
  readonly exited: Promise<void>;
  constructor(readonly child: ChildProcess) {
    child.stdout?.setEncoding("latin1").on("data", (d: string) => (this.out += d));
    child.stderr?.setEncoding("latin1").on("data", (d: string) => (this.out += d));
    this.exited = new Promise((r) => child.on("exit", () => r()));
  }
  async waitFor(re: RegExp, timeoutMs: number, what: string): Promise<RegExpExecArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = re.exec(this.out);
      if (m !== null) return m;
      if (this.child.exitCode !== null || this.child.signalCode !== null) throw new Error(`${what} ended: ${this.out.slice(-1500)}`);
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${this.out.slice(-1500)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  async kill(): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill("SIGKILL");
    await this.exited;
  }
}

/** netbench's three figures, run in the guest over SSH. */
function measure(ns: NetNs, key: string, sshTarget: string[], server: string, seconds: number): UsernetRates {
  const ssh = (cmd: string) => {
    const limit = 120 + seconds * 2;
    const r = ns.exec(["timeout", String(limit), "dbclient", "-y", "-y", "-i", key, ...sshTarget, cmd], { allowFail: true, timeoutMs: (limit + 10) * 1000 });
    if (r.status !== 0) throw new Error(`ssh ${cmd}: status ${r.status ?? r.signal}: ${r.stderr.trim()}`);
    return r.stdout;
  };
  ssh("mkdir -p /mnt && (mountpoint -q /mnt || mount -o ro /dev/vda /mnt)");
  const run = (mode: string, re: RegExp) => {
    const out = ssh(`/mnt/netbench client ${server} ${PORT} ${mode} ${seconds}`);
    const m = re.exec(out);
    if (m === null) throw new Error(`netbench ${mode}: ${out}`);
    return Number(m[1]);
  };
  return {
    tx: run("tx", /mbit_per_s=([\d.]+)/),
    rx: run("rx", /mbit_per_s=([\d.]+)/),
    rr: run("rr", /per_s=([\d.]+)/),
  };
}

/**
 * One VMM's figures for a round, tried a second time when the first try fails (an SSH
 * session dropped under emulation); says which VMM and round failed, and why.
 */
function measureOnce(who: string, round: number, fn: () => UsernetRates): UsernetRates {
  try {
    return fn();
  } catch (e) {
    console.error(`usernet: ${who}, round ${round + 1}: ${(e as Error).message.trim()}; measuring again`);
  }
  try {
    return fn();
  } catch (e) {
    throw new Error(`${who}, round ${round + 1}: ${(e as Error).message}`);
  }
}

export async function benchUsernet(options: UsernetBenchOptions = {}): Promise<UsernetBenchResult> {
  const why = usernetBenchSkipReason();
  if (why !== undefined) throw new Error(`bench-usernet: ${why}`);
  const seconds = options.seconds ?? 10;
  const rounds = options.rounds ?? 1;
  const guest = findDefaultGuest()!;
  const emulated = detectHostKvm().kind === "emulated-pvm";
  const { kernel, initrd } = bootFilesFor(guest, emulated);
  const cmdline = guest.cmdline ?? "console=ttyS0";
  const key = guest.sshKeyDropbear!;
  const bootTimeout = emulated ? 420_000 : 120_000;
  const tskvmBin = join(repoRoot(), "bin", "tskvm");
  const qemuBin = findExecutable("qemu-system-x86_64");

  const work = mkdtempSync(join(tmpdir(), "tskvm-bench-usernet-"));
  const ns = NetNs.create("bench-user");
  const tapNs = NetNs.create("bench-tap");
  const procs: Watched[] = [];
  const samples: Record<"tskvm" | "qemu" | "tap", UsernetRates[]> = { tskvm: [], qemu: [], tap: [] };
  try {
    addUplink(ns, "10.0.2.15", 24, GATEWAY);
    const netbench = buildNative("netbench", { static: true });
    const content = join(work, "disk");
    spawnSync("mkdir", [content]);
    copyFileSync(netbench, join(content, "netbench"));
    chmodSync(join(content, "netbench"), 0o755);
    const disk = join(work, "netbench.img");
    await makeDiskImage(content, disk);
    const server = (n: NetNs, address: string) => {
      const w = new Watched(spawn("ip", ["netns", "exec", n.name, netbench, "server", address, String(PORT)], { stdio: ["ignore", "pipe", "pipe"] }));
      procs.push(w);
      return w.waitFor(/ready/, 10_000, "the host's netbench server");
    };
    await server(ns, "127.0.0.1");

    for (let round = 0; round < rounds; round++) {
      // tskvm on passt
      {
        const vm = new Watched(
          spawn("ip", ["netns", "exec", ns.name, process.execPath, tskvmBin, "boot", "--net", "user", "-k", kernel, "-i", initrd, "-m", "256M", "-d", `${disk},readonly`], {
            stdio: ["pipe", "pipe", "pipe"],
          }),
        );
        procs.push(vm);
        const port = Number((await vm.waitFor(/^ssh -p (\d+) /m, 60_000, "tskvm's ssh line"))[1]);
        await vm.waitFor(/TSKVM-GUEST-READY/, bootTimeout, "tskvm's guest");
        samples.tskvm.push(measureOnce("tskvm on passt", round, () => measure(ns, key, ["-p", String(port), "root@127.0.0.1"], GATEWAY, seconds)));
        await vm.kill();
      }
      // QEMU on the same passt
      if (qemuBin !== undefined) {
        const passt = await Passt.start({ command: passtInNetns(ns) });
        try {
          const q = new Watched(
            spawn(
              "ip",
              [
                "netns", "exec", ns.name, qemuBin,
                "-M", "pc", "-enable-kvm", "-cpu", emulated ? QEMU_EMULATED_CPU : "host", "-m", "256", "-smp", "1",
                "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
                "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
                "-netdev", "stream,id=n0,server=off,addr.type=fd,addr.str=3", "-device", "virtio-net-pci,netdev=n0",
                "-drive", `file=${disk},format=raw,if=none,id=d0,readonly=on`, "-device", "virtio-blk-pci,drive=d0",
              ],
              { stdio: ["pipe", "pipe", "pipe", passt.fd] },
            ),
          );
          procs.push(q);
          await q.waitFor(/TSKVM-GUEST-READY/, bootTimeout, "QEMU's guest");
          samples.qemu.push(measureOnce("QEMU on passt", round, () => measure(ns, key, ["-p", String(passt.sshPort), "root@127.0.0.1"], GATEWAY, seconds)));
          await q.kill();
        } finally {
          await passt.stop();
        }
      }
      // tskvm on a TAP
      {
        const vm = new Watched(
          spawn(
            "ip",
            ["netns", "exec", tapNs.name, process.execPath, tskvmBin, "boot", "-t", "tap0", "--tap-ip", `${TAP_HOST}/24`, "--guest-ip", TAP_GUEST, "-k", kernel, "-i", initrd, "-m", "256M", "-d", `${disk},readonly`],
            { stdio: ["pipe", "pipe", "pipe"] },
          ),
        );
        procs.push(vm);
        await vm.waitFor(/TSKVM-GUEST-READY/, bootTimeout, "tskvm's guest on a TAP");
        // Only now: the host address is tskvm's to put on its TAP (--tap-ip).
        await server(tapNs, TAP_HOST);
        samples.tap.push(measureOnce("tskvm on a TAP", round, () => measure(tapNs, key, [`root@${TAP_GUEST}`], TAP_HOST, seconds)));
        await vm.kill();
      }
    }
  } finally {
    for (const p of procs) await p.kill();
    ns.destroy();
    tapNs.destroy();
    rmSync(work, { recursive: true, force: true });
  }
  const med = (xs: UsernetRates[]): UsernetRates => ({ tx: median(xs.map((x) => x.tx)), rx: median(xs.map((x) => x.rx)), rr: median(xs.map((x) => x.rr)) });
  const tskvm = med(samples.tskvm);
  const qemu = samples.qemu.length > 0 ? med(samples.qemu) : "skipped: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)";
  return {
    seconds,
    rounds,
    tskvm,
    qemu,
    tap: med(samples.tap),
    ratio: typeof qemu === "string" ? undefined : { tx: tskvm.tx / qemu.tx, rx: tskvm.rx / qemu.rx, rr: tskvm.rr / qemu.rr },
  };
}

export function formatUsernetBench(r: UsernetBenchResult): string {
  const fig = (x: UsernetRates | string, k: keyof UsernetRates) => (typeof x === "string" ? "-" : k === "rr" ? `${x[k].toFixed(0)}/s` : `${x[k].toFixed(1)} Mbit/s`);
  const names: Record<keyof UsernetRates, string> = { tx: "TCP guest->host", rx: "TCP host->guest", rr: "TCP 1-byte request/response" };
  const lines = (Object.keys(names) as (keyof UsernetRates)[]).map(
    (k) =>
      `${names[k]}: tskvm ${fig(r.tskvm, k)}, QEMU ${fig(r.qemu, k)}${r.ratio === undefined ? "" : `: ratio ${r.ratio[k].toFixed(2)} (target >= 1)`}; TAP ${fig(r.tap, k)}`,
  );
  if (typeof r.qemu === "string") lines.push(`QEMU ${r.qemu}`);
  lines.push(`(the guest's own figures, ${r.seconds} s each, median of ${r.rounds} round${r.rounds > 1 ? "s" : ""}; tskvm and QEMU on the same passt)`);
  return lines.join("\n");
}

if (require.main === module) {
  runStandalone<UsernetBenchOptions, UsernetBenchResult>("bench-usernet", { "--seconds": "seconds", "--rounds": "rounds" }, benchUsernet, formatUsernetBench);
}
