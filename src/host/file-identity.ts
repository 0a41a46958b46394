/**
 * What the file system says about a file, enough to notice that it was replaced or
 * changed since: real path, size, modification time (ns), inode and device. Used for the
 * files a snapshot depends on (disk images the guest had in use, a run's kernel and initrd)
 * without reading their contents.
 */
import { fstatSync, realpathSync, statSync, type BigIntStats } from "node:fs";

export interface FileIdentity {
  path: string;
  size: number;
  mtimeNs: string;
  ino: string;
  dev: string;
}

function identityOf(path: string, st: BigIntStats): FileIdentity {
  return { path, size: Number(st.size), mtimeNs: st.mtimeNs.toString(), ino: st.ino.toString(), dev: st.dev.toString() };
}

export function fileIdentity(path: string): FileIdentity {
  const real = realpathSync(path);
  return identityOf(real, statSync(real, { bigint: true }));
}

/** The identity of an open file (what is open now, whatever its path names meanwhile). */
export function openFileIdentity(fd: number, path: string): FileIdentity {
  return identityOf(path, fstatSync(fd, { bigint: true }));
}

/** How `now` differs from `then`, in words, or undefined when it is the same file, unchanged. */
export function identityChange(then: FileIdentity, now: FileIdentity): string | undefined {
  if (then.dev !== now.dev || then.ino !== now.ino) return "it is another file now";
  if (then.size !== now.size) return `its size changed from ${then.size} to ${now.size} bytes`;
  if (then.mtimeNs !== now.mtimeNs) return "it was written since";
  return undefined;
}
