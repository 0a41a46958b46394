/** tskvm's exit statuses: one meaning each, documented in the README. */
export const ExitCode = {
  /** The guest ended normally (reset, power-off) or the user quit (Ctrl-A x). */
  OK: 0,
  /** The guest failed: KVM could not run it (internal error, entry failure, unhandled exit). */
  GUEST_FAILED: 1,
  /** Bad command line: unknown flag, bad value, impossible configuration. */
  USAGE: 2,
  /** A file the user named cannot be used: missing, unreadable, not a kernel, too big. */
  BAD_INPUT: 3,
  /** The host cannot run VMs: no /dev/kvm, no permission, missing KVM capability, no memory. */
  HOST: 4,
  /** A bug in tskvm. */
  INTERNAL: 70,
  /** 128 + signal number, as shells report it: SIGINT 130, SIGTERM 143. */
  SIGNAL_BASE: 128,
} as const;
