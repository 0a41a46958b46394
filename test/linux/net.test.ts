/**
 * Tier 3: virtio-net on a TAP with a real Linux guest, inside a network namespace this test
 * creates (addresses only inside it). tskvm creates the TAP and brings its host end up
 * (--tap-ip); the kernel configures eth0 from the ip= argument tskvm adds (--guest-ip).
 * Then, from the namespace: ping, SSH with the guest build's key (output and exit status),
 * HTTP both ways with busybox (the guest fetches from the host, the host from the guest);
 * SIGTERM ends tskvm with status 143, and nothing is left behind: no TAP, no lock on the
 * disk image, no process.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { bootFilesFor } from "../../src/api/default-guest";
import { RunningCli } from "../helpers/cli";
import { NetNs, netTestSkipReason } from "../helpers/netns";
import { guestSkip, hostKvm, scaled, whereItRuns } from "../helpers/tiers";
import { waitUntil } from "../helpers/wait";

const { guest: built, skip } = guestSkip();
const emulated = skip === false && hostKvm().kind === "emulated-pvm";
const TIMEOUT_MS = skip === false && hostKvm().softwareEmulated ? 420_000 : 60_000;
const HOST = "192.168.100.1";
const GUEST = "192.168.100.2";

function which(cmd: string): boolean {
  return ["/usr/bin", "/bin", "/usr/sbin", "/sbin"].some((d) => existsSync(join(d, cmd)));
}

test("virtio-net: the guest is on the TAP: ping, SSH, HTTP both ways", { skip, timeout: 900_000 }, async (t) => {
  const netSkip = netTestSkipReason();
  if (netSkip !== undefined) return t.skip(netSkip);
  for (const tool of ["busybox", "dbclient"]) {
    if (!which(tool)) return t.skip(`${tool} is not installed (Debian: busybox-static, dropbear-bin)`);
  }
  const guest = built!;
  t.diagnostic(`tier: Linux on ${whereItRuns()}`);
  assert.ok(guest.sshKeyDropbear !== undefined || guest.sshKey !== undefined, "the guest build provides an SSH key");
  const key = guest.sshKeyDropbear ?? guest.sshKey!;
  const { kernel, initrd } = bootFilesFor(guest, emulated);
  const ns = NetNs.create("vm");
  const www = mkdtempSync(join(tmpdir(), "tskvm-www-"));
  const served = `served-by-the-host-${process.pid}`;
  writeFileSync(join(www, "hello.txt"), `${served}\n`);
  let httpd: ReturnType<typeof spawn> | undefined;
  const disk = join(www, "disk.img");
  writeFileSync(disk, new Uint8Array(4 * 1024 * 1024));
  const vm = new RunningCli(
    ["boot", "-k", kernel, "-i", initrd, "-m", "128M", "-d", disk, "-t", "tap0", "--tap-ip", `${HOST}/24`, "--guest-ip", GUEST],
    {},
    ["ip", "netns", "exec", ns.name],
  );
  try {
    const configured = await vm.waitFor(
      new RegExp(`IP-Config: Complete:\\r?\\n[^\\n]*device=eth0, hwaddr=52:54:00:[0-9a-f:]+, ipaddr=${GUEST.replace(/\./g, "\\.")}`),
      TIMEOUT_MS,
    );
    t.diagnostic(`the kernel configured eth0 through virtio-net after ${configured} ms`);
    const ready = await vm.waitFor(/TSKVM-GUEST-READY/, TIMEOUT_MS);
    t.diagnostic(`ready marker after ${ready} ms`);

    const ping = ns.exec(["busybox", "ping", "-c", "3", "-W", "5", GUEST], { allowFail: true });
    assert.equal(ping.status, 0, `ping from the namespace: ${ping.stdout}${ping.stderr}`);
    t.diagnostic(ping.stdout.trim().split("\n").pop() ?? "");

    const ssh = (command: string) =>
      ns.exec(["timeout", "120", "dbclient", "-y", "-i", key, `root@${GUEST}`, command], { allowFail: true });
    const first = Date.now();
    const r = ssh("echo hello-over-ssh; nproc; exit 3");
    t.diagnostic(`SSH command round trip ${Date.now() - first} ms`);
    assert.equal(r.status, 3, `the command's exit status comes back; stderr: ${r.stderr}`);
    assert.match(r.stdout, /^hello-over-ssh\n1\n$/);

    // The namespace's own web server (its only addresses are the TAP's and lo).
    httpd = spawn("ip", ["netns", "exec", ns.name, "busybox", "httpd", "-f", "-p", "8080", "-h", www], { stdio: "ignore" });
    await waitUntil(
      () => ns.exec(["busybox", "wget", "-q", "-O", "-", "http://127.0.0.1:8080/hello.txt"], { allowFail: true }).status === 0,
      scaled(10_000),
      "the namespace's web server",
    );
    const get = ssh(`wget -q -O - http://${HOST}:8080/hello.txt`);
    assert.equal(get.status, 0, get.stderr);
    assert.equal(get.stdout, `${served}\n`, "the guest fetched the host's file");

    const start = ssh("mkdir -p /tmp/www && echo served-by-the-guest > /tmp/www/index.html && httpd -p 80 -h /tmp/www && echo started");
    assert.match(start.stdout, /started/, start.stderr);
    const back = ns.exec(["busybox", "wget", "-q", "-O", "-", `http://${GUEST}/index.html`], { allowFail: true });
    assert.equal(back.stdout, "served-by-the-guest\n", `the host fetched the guest's file: ${back.stderr}`);

    // A killed parent: SIGTERM stops the VM and cleans up.
    assert.equal(ns.linkExists("tap0"), true);
    assert.notEqual(spawnSync("flock", ["-n", "-x", disk, "true"]).status, 0, "the image is locked while the VM runs");
    vm.kill("SIGTERM");
    assert.equal((await vm.exited).code, 143, vm.stderr);
    assert.match(vm.stderr, /stopped by SIGTERM/);
    assert.equal(ns.linkExists("tap0"), false, "the TAP tskvm created is gone");
    assert.equal(spawnSync("flock", ["-n", "-x", disk, "true"]).status, 0, "the image lock is released");
    assert.notEqual(spawnSync("pgrep", ["-f", disk]).status, 0, "no tskvm process is left");
  } finally {
    vm.kill();
    httpd?.kill();
    ns.destroy();
    rmSync(www, { recursive: true, force: true });
  }
});
