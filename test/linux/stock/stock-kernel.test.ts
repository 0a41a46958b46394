/**
 * The Linux tier with a stock distribution kernel: Debian's linux-image bzImage, unmodified
 * (guest/debian-kernel.sh), booted by `tskvm run -k vmlinuz --modules DIR` with the default
 * guest's initrd, as a user would. Its virtio and ext4 drivers are modules, which --modules
 * adds to the initrd and /init loads. Checked: the ready marker with nproc = -c (1 and 2),
 * commands and their exit statuses through the agent, ext4 on virtio-blk, ping and HTTP on
 * virtio-net, and a consistent XSAVE layout (CPUID leaf 0xD) as the kernel checks it.
 *
 * Needs KVM with hardware semantics: on kvm-pvm a stock kernel never reaches user space, so
 * `npm test` runs this directory in the harness VM there (scripts/test.ts).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { runCliAsync } from "../../helpers/cli";
import { NetNs, netTestSkipReason } from "../../helpers/netns";
import { guestSkip, scaled, stockKernelSkip, whereItRuns } from "../../helpers/tiers";
import { waitUntil } from "../../helpers/wait";
import { makeDiskImage } from "../../../src/api";

const { kernel: stock, skip: noStock } = stockKernelSkip();
const { skip: noGuest } = guestSkip();
const skip = noStock || noGuest;
/** A stock kernel boots in ~25 s in the harness VM (software-emulated CPU), seconds on hardware. */
const READY_S = Math.round(scaled(36_000) / 1000);
const RUN_MS = scaled(60_000);
const TEST_MS = scaled(90_000);
const dir = mkdtempSync(join(tmpdir(), "tskvm-stock-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));

/** `tskvm run -k <stock vmlinuz> --modules <its modules>` with the default guest's initrd. */
function run(args: string[], wrapper: string[] = []) {
  const argv = ["run", "-k", stock!.vmlinuz, "--modules", stock!.modules, "-m", "256M", "--ready-timeout", String(READY_S), ...args];
  return runCliAsync(argv, { timeoutMs: RUN_MS, wrapper });
}

function consoleChecks(log: string, cpus: number): void {
  const text = readFileSync(log, "latin1");
  assert.match(text, new RegExp(`Linux version ${stock!.release.replace(/\./g, "\\.")} \\(debian-kernel@lists\\.debian\\.org\\)`), "Debian's own kernel booted");
  assert.match(text, new RegExp(`TSKVM-GUEST-READY nproc=${cpus}\\b`));
  assert.match(text, new RegExp(`smp: Brought up 1 node, ${cpus} CPUs?`));
  // The XSAVE layout tskvm describes in CPUID leaf 0xD matches what the kernel enables.
  const complaint = (re: RegExp) => text.split("\n").find((l) => re.test(l));
  assert.equal(complaint(/XSAVE consistency problem/), undefined, "CPUID 0xD's sizes agree with the XCR0 the kernel enables");
  assert.equal(complaint(/tskvm-init: insmod .* failed/), undefined, "every module loads");
}

for (const cpus of [1, 2]) {
  test(`a stock Debian kernel reaches user space with ${cpus} vCPU${cpus > 1 ? "s" : ""}: ready marker, nproc, a command's output and exit status`, { skip, timeout: TEST_MS }, async (t) => {
    t.diagnostic(`tier: Linux/stock on ${whereItRuns()}; ${stock!.package} ${stock!.version}`);
    const log = join(dir, `console-${cpus}.log`);
    const r = await run(["-c", String(cpus), "--console-log", log, "--", "sh", "-c", "nproc; uname -r; grep -c . /proc/modules >&2; exit 3"]);
    t.diagnostic(`tskvm run with ${cpus} vCPU(s): ${r.ms} ms`);
    assert.equal(r.status, 3, r.stderr);
    assert.equal(r.stdout, `${cpus}\n${stock!.release}\n`);
    assert.ok(Number(r.stderr.trim()) >= 10, `the driver modules are loaded: ${r.stderr}`);
    consoleChecks(log, cpus);
  });
}

test("a stock kernel's ext4 on virtio-blk: the guest reads the host's files and writes one back", { skip, timeout: TEST_MS }, async (t) => {
  const src = join(dir, "project");
  mkdirSync(src);
  writeFileSync(join(src, "hello.txt"), "from the host\n");
  const img = join(dir, "disk.img");
  await makeDiskImage(src, img);
  const r = await run(["-d", img, "--", "mount -t ext4 /dev/vda /mnt && cat /mnt/hello.txt && echo written-by-debian > /mnt/result && umount /mnt && grep -E '^(virtio_blk|ext4) ' /proc/modules | cut -d' ' -f1"]);
  t.diagnostic(`disk round trip: ${r.ms} ms`);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout, "from the host\next4\nvirtio_blk\n");
  const back = spawnSync("debugfs", ["-R", "cat /result", img], { encoding: "utf8" });
  assert.equal(back.stdout, "written-by-debian\n", back.stderr);
});

test("a stock kernel's virtio-net on a TAP: ping and HTTP with the host, in a namespace", { skip: skip || (netTestSkipReason() ?? false), timeout: TEST_MS }, async (t) => {
  const HOST = "192.168.100.1";
  const GUEST = "192.168.100.2";
  const ns = NetNs.create("stock");
  const www = join(dir, "www");
  mkdirSync(www, { recursive: true });
  writeFileSync(join(www, "index.html"), `served-to-debian-${process.pid}\n`);
  const httpd = spawn("ip", ["netns", "exec", ns.name, "busybox", "httpd", "-f", "-p", "8080", "-h", www], { stdio: "ignore" });
  try {
    await waitUntil(
      () => ns.exec(["busybox", "wget", "-q", "-O", "-", "http://127.0.0.1:8080/index.html"], { allowFail: true }).status === 0,
      scaled(10_000),
      "the namespace's web server",
    );
    const r = await run(
      ["-t", "tap0", "--tap-ip", `${HOST}/24`, "--guest-ip", GUEST, "--", `ping -c 2 -W 5 ${HOST} >/dev/null && wget -q -O - http://${HOST}:8080/index.html && grep -c '^virtio_net ' /proc/modules`],
      ["ip", "netns", "exec", ns.name],
    );
    t.diagnostic(`ping + HTTP from the guest: ${r.ms} ms`);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, `served-to-debian-${process.pid}\n1\n`);
    assert.equal(ns.linkExists("tap0"), false, "the TAP tskvm made is gone");
  } finally {
    httpd.kill();
    ns.destroy();
  }
});
