/**
 * startVm()'s option checks and typed errors, and the package entry point. None of these
 * cases gets as far as running a guest.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as pkg from "../../src/index";
import { startVm, VmStartError, VmError, type VmOptions, type VmStartFailure } from "../../src/api";
import { checkOptions, guestIpArgument } from "../../src/api/start";
import { classifyError } from "../../src/cli/main";
import { ExitCode } from "../../src/cli/exit-codes";
import { makeBzImage } from "../helpers/images";

const dir = mkdtempSync(join(tmpdir(), "tskvm-api-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
const kernel = join(dir, "bzImage");
writeFileSync(kernel, makeBzImage({ codeBytes: 64 * 1024 }));

async function startFails(options: VmOptions, failure: VmStartFailure, message: RegExp): Promise<void> {
  const e = await startVm(options).then(
    async (vm) => {
      await vm.stop();
      return undefined;
    },
    (err: unknown) => err,
  );
  assert.ok(e instanceof VmStartError, `expected a VmStartError, got ${String(e)}`);
  assert.ok(e instanceof VmError);
  assert.equal(e.failure, failure, e.message);
  assert.match(e.message, message);
  assert.equal(e.message.includes("\n"), false, "one line");
}

test("the package exports the API", () => {
  for (const name of ["startVm", "Vm", "VmError", "VmStartError", "VmTimeoutError", "VmExitedError", "GuestAgentError", "makeDiskImage", "DiskBuildError", "commandLine"]) {
    assert.ok(name in pkg, name);
  }
});

test("bad options: VmStartError with failure 'options', one line each", async () => {
  const base = { kernel, initrd: null, agent: false } as const;
  await startFails({ ...base, memory: "12X" }, "options", /bad memory size '12X'/);
  await startFails({ ...base, memory: 1000 }, "options", /multiple of 4 KiB/);
  await startFails({ ...base, memory: "100T" }, "options", /more than this host's/);
  await startFails({ ...base, cpus: 0 }, "options", /at least 1/);
  await startFails({ ...base, guestIp: "10.0.0.2" }, "options", /needs a network interface/);
  await startFails({ ...base, nics: [{ tap: "t0", hostCidr: "1.2.3/24" }] }, "options", /bad nics.hostCidr: host address "1.2.3\/24"/);
  await startFails({ ...base, nics: [{ tap: "t0", mac: "zz" }] }, "options", /MAC/i);
  await startFails({ ...base, console: { fd: 1 }, consoleLog: join(dir, "log") }, "options", /consoleLog needs console: "capture"/);
  await startFails({ ...base, disks: ["a.img,bogus"] }, "input", /unknown disk option/);
});

test("files that cannot be used: failure 'input'", async () => {
  await startFails({ kernel: join(dir, "missing"), initrd: null }, "input", /kernel image '.*missing' does not exist/);
  await startFails({ kernel, initrd: join(dir, "nord") }, "input", /initrd '.*nord' does not exist/);
  await startFails({ kernel, initrd: null, consoleLog: join(dir, "no", "such", "log") }, "input", /console log .* cannot be written/);
});

test("no KVM device: failure 'host'", async () => {
  await startFails({ kernel, initrd: null, kvmPath: join(dir, "no-kvm") }, "host", /does not exist/);
});

test("the CLI maps start failures to its exit statuses", () => {
  const code = (failure: VmStartFailure) => classifyError(new VmStartError(failure, "x")).code;
  assert.equal(code("options"), ExitCode.USAGE);
  assert.equal(code("input"), ExitCode.BAD_INPUT);
  assert.equal(code("host"), ExitCode.HOST);
  assert.equal(code("internal"), ExitCode.INTERNAL);
  assert.match(classifyError(new Error("boom")).message, /^internal error: boom/);
});

test("checkOptions: defaults, the agent's argument, appended arguments, ip=", () => {
  const d = checkOptions({});
  assert.equal(d.memoryBytes, 256 * 1024 * 1024);
  assert.equal(d.cpus, 1);
  assert.equal(d.agent, true);
  assert.deepEqual(d.extraArgs, ["tskvm.agent=1"]);
  const o = checkOptions({ agent: false, memory: "1G", appendCmdline: ["quiet", " "], nics: [{ tap: "t0", hostCidr: "192.168.7.1/24" }], guestIp: "192.168.7.2", disks: ["x.img,readonly", { path: "y.img", serial: "s" }] });
  assert.equal(o.memoryBytes, 1024 ** 3);
  assert.deepEqual(o.extraArgs, ["ip=192.168.7.2::192.168.7.1:255.255.255.0::eth0:off", "quiet"]);
  assert.deepEqual(o.disks, [{ path: "x.img", readOnly: true }, { path: "y.img", readOnly: false, serial: "s" }]);
  assert.equal(guestIpArgument("10.0.0.2", undefined), "ip=10.0.0.2:::255.255.255.0::eth0:off");
});

test("an option error names the option; the API says it by field, the CLI by flag", async () => {
  const e = await startVm({ kernel, initrd: null, agent: false, guestIp: "10.0.0.2" }).then(
    () => assert.fail("started"),
    (err: unknown) => err,
  );
  assert.ok(e instanceof VmStartError);
  assert.equal(e.option, "guestIp");
  assert.equal(e.message, "guestIp needs a network interface: add nics");
  const cli = classifyError(e);
  assert.equal(cli.code, ExitCode.USAGE);
  assert.equal(cli.message, "--guest-ip needs a network interface: add --tap NAME");
  assert.doesNotMatch(checkOptionsError({ cpus: 0 }), /-c/, "no flag in the API's message");
});

function checkOptionsError(o: VmOptions): string {
  try {
    checkOptions(o);
  } catch (e) {
    return (e as Error).message;
  }
  return assert.fail("checkOptions accepted it");
}

test("checkOptions: shares become tags and the default guest's mount arguments", () => {
  const c = checkOptions({ shares: ["/srv/a,readonly", { path: "/srv/b", tag: "bee" }], rootfs: "host" });
  assert.deepEqual(c.shares, [
    { hostPath: "/srv/a", tag: "a", readOnly: true },
    { hostPath: "/srv/b", tag: "bee", readOnly: false },
  ]);
  assert.equal(c.rootfsHost, true);
  assert.deepEqual(c.extraArgs.filter((a) => a.startsWith("tskvm.") && a !== "tskvm.agent=1"), [
    "tskvm.rootfs=tskvm-rootfs",
    "tskvm.share=a,ro,/srv/a",
    "tskvm.share=bee,rw,/srv/b",
  ]);
  const unmounted = checkOptions({ shares: ["/srv/a"], mountShares: false });
  assert.equal(unmounted.shares.length, 1);
  assert.equal(unmounted.extraArgs.some((a) => a.startsWith("tskvm.share=")), false);
  assert.throws(() => checkOptions({ rootfs: "guest" as "host" }), /bad rootfs 'guest'/);
});
