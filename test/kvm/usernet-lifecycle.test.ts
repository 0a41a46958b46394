/**
 * `tskvm boot -n user` with tiny guests (no Linux needed): on every way tskvm can end
 * (the guest powers off or resets, Ctrl-A x, SIGTERM, SIGKILL) passt ends too, its ports
 * close and no runtime directory is left. Runs in a network namespace with an uplink (passt
 * needs a default route), so it needs root, /dev/kvm and passt.
 */
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { writeTinyKernel } from "../helpers/images";
import { HALT, SPIN, longModeHello } from "../helpers/guest-code";
import { RunningCli } from "../helpers/cli";
import { waitUntil } from "../helpers/wait";
import { NetNs } from "../helpers/netns";
import { addUplink, passtProcesses, passtRuntimeDirs, passtSkipReason, testMark } from "../helpers/passt";

const noKvm = existsSync("/dev/kvm") ? undefined : "no /dev/kvm on this host";
const skip = noKvm ?? passtSkipReason();
const dir = mkdtempSync(join(tmpdir(), "tskvm-usernet-life-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
const kernel = (name: string, code: Uint8Array) => writeTinyKernel(dir, name, code);


describe("tskvm -n user: passt ends with tskvm on every exit path", { skip }, () => {
  let ns: NetNs;
  let kernels: { halt: string; hello: string; spin: string };
  before(() => {
    ns = NetNs.create("usernet-life");
    addUplink(ns);
    kernels = { halt: kernel("halt.elf", HALT), hello: kernel("hello.elf", longModeHello("hello\n")), spin: kernel("spin.elf", SPIN) };
  });
  after(() => ns?.destroy());

  /** Start tskvm boot -n user; resolves once passt runs (the ssh line is out), with its SSH port. */
  async function boot(k: string): Promise<{ vm: RunningCli; mark: string; port: number }> {
    const mark = testMark();
    const vm = new RunningCli(["boot", "-k", k, "-m", "32M", "-n", "user"], mark.env, ["ip", "netns", "exec", ns.name]);
    let port = 0;
    await waitUntil(() => {
      const m = /^ssh -p (\d+) root@127\.0\.0\.1 +# tskvm: log into the guest$/m.exec(vm.stderr);
      if (m !== null) port = Number(m[1]);
      return m !== null || vm.child.exitCode !== null;
    }, 60_000, "the ssh line");
    assert.ok(port > 0, `no ssh line: ${vm.stderr}`);
    return { vm, mark: mark.value, port };
  }

  const listening = (port: number) => ns.exec(["ss", "-Htln", `sport = :${port}`]).stdout.trim() !== "";

  async function expectGone(vm: RunningCli, mark: string, port: number): Promise<void> {
    await waitUntil(() => passtProcesses(mark).length === 0, 10_000, "passt to end");
    assert.equal(listening(port), false, "the SSH port is closed");
    assert.deepEqual(passtRuntimeDirs(vm.child.pid!), []);
  }

  for (const [how, which, code, pattern] of [
    ["the guest powers off (every vCPU halted)", "halt", 0, /halted/],
    ["the guest resets (i8042)", "hello", 0, /i8042 reset/],
  ] as const) {
    it(how, { timeout: 120_000 }, async () => {
      const { vm, mark, port } = await boot(kernels[which]);
      const exit = await vm.exited;
      assert.equal(exit.code, code, vm.stderr);
      assert.match(vm.stderr, pattern);
      // tskvm waited for passt: it is gone the moment tskvm is.
      assert.deepEqual(passtProcesses(mark), []);
      await expectGone(vm, mark, port);
    });
  }

  for (const [how, act, code] of [
    ["Ctrl-A x", (vm: RunningCli) => vm.send("\x01x"), 0],
    ["SIGTERM", (vm: RunningCli) => vm.kill("SIGTERM"), 143],
    ["SIGKILL (passt sees its socket close)", (vm: RunningCli) => vm.kill("SIGKILL"), null],
  ] as const) {
    it(how, { timeout: 120_000 }, async () => {
      const { vm, mark, port } = await boot(kernels.spin);
      assert.equal(passtProcesses(mark).length, 1, "passt runs beside the VM");
      assert.ok(listening(port));
      act(vm);
      const exit = await vm.exited;
      assert.equal(exit.code, code, vm.stderr);
      await expectGone(vm, mark, port);
    });
  }

  it("passt killed while the VM runs: one line, and tskvm carries on until told to stop", { timeout: 120_000 }, async () => {
    const { vm, mark, port } = await boot(kernels.spin);
    const [pid] = passtProcesses(mark);
    assert.ok(pid !== undefined);
    process.kill(pid, "SIGKILL");
    await waitUntil(() => /passt was killed by SIGKILL/.test(vm.stderr), 60_000, "tskvm's line about passt");
    const lines = vm.stderr.split("\n").filter((l) => /passt/.test(l) && !/^ssh /.test(l) && !/booting/.test(l));
    assert.deepEqual(lines, ["tskvm: passt was killed by SIGKILL: the guest's network (eth0) is down; the VM keeps running"]);
    assert.equal(vm.child.exitCode, null, "still running");
    vm.send("\x01x");
    assert.equal((await vm.exited).code, 0, vm.stderr);
    await expectGone(vm, mark, port);
  });
});
