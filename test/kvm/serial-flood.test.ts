/**
 * A guest that floods its serial console. Its output goes where the console goes at the
 * speed that takes it (a reader that stops reading stops the guest's UART, as a real one
 * would), and tskvm still stops at once when asked, whether or not anyone reads.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { SERIAL_FLOOD } from "../helpers/guest-code";
import { makeElf } from "../helpers/images";
import { TSKVM_BIN, scratchDir } from "../helpers/cli";
import { waitUntil } from "../helpers/wait";
import { kvmSkip, scaled } from "../helpers/tiers";

const noKvm = kvmSkip();
const scratch = scratchDir("tskvm-flood-");
const KERNEL_AT = 0x100_0000;
const flood = join(scratch.dir, "flood.elf");
writeFileSync(flood, makeElf({ segments: [{ paddr: KERNEL_AT, data: SERIAL_FLOOD }], entry: KERNEL_AT }));

/** Some thread of `pid` sleeps in a write to a full pipe or socket, or in poll(2) for room in one (not epoll: the event loop). */
function threadWaitsToWrite(pid: number): boolean {
  return readdirSync(`/proc/${pid}/task`).some((tid) => {
    try {
      return /^(poll_schedule_timeout|do_sys_poll|pipe_write|sock_alloc_send|unix_stream_sendmsg|wait_woken)/.test(readFileSync(`/proc/${pid}/task/${tid}/wchan`, "utf8"));
    } catch {
      return false; // the thread ended meanwhile
    }
  });
}

for (const reading of [true, false]) {
  test(`SIGTERM stops a guest flooding its console ${reading ? "into a reader" : "into a pipe nobody reads"}: status 143, promptly`, { skip: noKvm, timeout: scaled(90_000) }, async () => {
    const child = spawn(process.execPath, [TSKVM_BIN, "boot", "-k", flood, "-m", "32M"], { stdio: ["ignore", "pipe", "pipe"] });
    let out = 0;
    let stderr = "";
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) => child.on("exit", (code, signal) => res({ code, signal })));
    if (reading) child.stdout.on("data", (d: Buffer) => (out += d.length));
    else child.stdout.pause();
    try {
      await waitUntil(() => /tskvm: booting /.test(stderr), scaled(30_000), "the boot banner");
      if (reading) await waitUntil(() => out >= 1024 * 1024, scaled(60_000), "a MiB of console output");
      else await waitUntil(() => threadWaitsToWrite(child.pid!), scaled(60_000), "a vCPU thread waiting for the full console pipe");
      const asked = Date.now();
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), scaled(20_000));
      const exit = await exited;
      clearTimeout(timer);
      assert.equal(exit.code, 143, `exit ${JSON.stringify(exit)} after ${Date.now() - asked} ms; stderr:\n${stderr}`);
      assert.match(stderr, /tskvm: stopped by SIGTERM\n$/);
    } finally {
      child.kill("SIGKILL");
    }
  });
}
