/**
 * Errors from loading a guest kernel. Each message is one line saying what is wrong and,
 * where there is one, what to do about it. The loaders see byte arrays, not files, so a
 * message names its subject generically ("kernel image ..."); the caller that read the
 * file adds the path with withPath ("kernel image /boot/vmlinuz ...").
 */
export class BootError extends Error {
  /** `subject` starts the message ("kernel image"), `problem` finishes it ("is truncated: ..."). */
  constructor(
    readonly subject: string,
    readonly problem: string,
    readonly path?: string,
  ) {
    super(composeMessage(subject, problem, path));
    this.name = new.target.name;
  }

  /** The same error, with the file's path after the subject. */
  withPath(path: string): this {
    const message = composeMessage(this.subject, this.problem, path);
    const copy = Object.assign(Object.create(Object.getPrototypeOf(this)) as this, this, { path, message });
    copy.stack = this.stack?.replace(this.message, message);
    return copy;
  }
}

function composeMessage(subject: string, problem: string, path: string | undefined): string {
  return path === undefined ? `${subject} ${problem}` : `${subject} ${path} ${problem}`;
}

/** The kernel image is not something tskvm can boot, or does not fit in guest RAM. */
export class KernelImageError extends BootError {
  constructor(problem: string, path?: string) {
    super("kernel image", problem, path);
  }
}

/** The initrd cannot be placed where the kernel can reach it. */
export class InitrdError extends BootError {
  constructor(problem: string, path?: string) {
    super("initrd", problem, path);
  }
}

/** The kernel command line is unacceptable (too long, embedded NUL). */
export class CmdlineError extends BootError {
  constructor(problem: string) {
    super("kernel command line", problem);
  }
}

/** "200 MiB", "1.5 MiB", "640 KiB", "100 bytes": sizes as a user reads them. */
export function formatSize(bytes: number): string {
  const MiB = 1024 * 1024;
  if (bytes >= MiB) return `${trim(bytes / MiB)} MiB`;
  if (bytes >= 1024) return `${trim(bytes / 1024)} KiB`;
  return `${bytes} bytes`;
}

function trim(n: number): string {
  return Number.isInteger(n) ? String(n) : n.toFixed(1);
}

export function hex(n: number): string {
  return `0x${n.toString(16)}`;
}
