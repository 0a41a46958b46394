/**
 * `tskvm mkdisk DIR OUT.img`: an ext4 image of a directory (makeDiskImage in src/api/disk.ts).
 */
import { ExitCode, signalExitCode, type StopSignal } from "./exit-codes";
import { onStopSignal } from "./stop-signals";
import { MKDISK_USAGE, parseMkdiskArgs } from "./args";
import { formatBytes } from "../vmm/machine";
import { makeDiskImage } from "../api/disk";

export async function mkdiskCommand(argv: readonly string[]): Promise<number> {
  const o = parseMkdiskArgs(argv);
  if (o.help) {
    process.stdout.write(`${MKDISK_USAGE}\n`);
    return ExitCode.OK;
  }
  const abort = new AbortController();
  let signal: StopSignal | undefined;
  const off = onStopSignal((s) => {
    signal ??= s;
    abort.abort();
  });
  try {
    const r = await makeDiskImage(o.dir, o.out, {
      ...(o.sizeBytes !== undefined ? { sizeBytes: o.sizeBytes } : {}),
      ...(o.label !== undefined ? { label: o.label } : {}),
      force: o.force,
      signal: abort.signal,
    });
    process.stderr.write(
      `tskvm: wrote ${o.out}: ${formatBytes(r.sizeBytes)} ext4 image with ${r.entries} entr${r.entries === 1 ? "y" : "ies"} ` +
        `(${formatBytes(r.contentBytes)} of file data) from ${o.dir}\n`,
    );
    return ExitCode.OK;
  } catch (e) {
    if (signal !== undefined) {
      process.stderr.write(`tskvm: stopped by ${signal}; nothing written\n`);
      return signalExitCode(signal);
    }
    throw e;
  } finally {
    off();
  }
}
