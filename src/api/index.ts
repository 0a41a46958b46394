/**
 * tskvm's TypeScript API: start a KVM virtual machine, watch its console, run commands in
 * the guest and get their exit status and output, stop it. See docs/api.md.
 *
 *   import { startVm } from "tskvm";
 *   const vm = await startVm({ memory: "512M", disks: ["tests.img"] });
 *   await vm.ready({ timeoutMs: 300_000 });
 *   const r = await vm.run("mount /dev/vda /mnt && make -C /mnt check", { timeoutMs: 600_000 });
 *   await vm.poweroff();
 */
export { startVm, Vm, formatMs, type ConsoleMatch, type WaitForConsoleOptions } from "./vm";
export { VmError, VmStartError, VmTimeoutError, VmExitedError, GuestAgentError, VmSnapshotError, type VmStartFailure, type VmWait } from "./errors";
export { snapshotCacheEntry, type SnapshotCacheEntry } from "./snapshot-cache";
export type { VmOptions, VmExit, VmInfo, ReadyInfo, RunOptions, RunResult, DiskOptions, NicOptions, ConsoleMode, SnapshotOptions, SnapshotInfo } from "./types";
export { shareMountCommand, type Share, type ShareOptions } from "./shares";
export { makeDiskImage, DiskBuildError, type MakeDiskOptions, type MakeDiskResult } from "./disk";
export { DEFAULT_CMDLINE, DEFAULT_MEMORY_BYTES } from "./start";
export { commandLine, shellQuote } from "./protocol";
