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
  /** tskvm run: the guest did not become ready in time (--ready-timeout), or ended before it did. */
  NOT_READY: 5,
  /** tskvm run: the command did not finish in time (--timeout); the VM was stopped. */
  COMMAND_TIMEOUT: 6,
  /** tskvm run: the guest ended (reset, power-off, halt) before the command reported its status. */
  GUEST_ENDED: 7,
  /** The guest's kernel panicked (pvpanic, KVM's crash event, or "Kernel panic" on its console). */
  GUEST_PANICKED: 8,
  /** A bug in tskvm. */
  INTERNAL: 70,
  /** 128 + signal number, as shells report it: SIGINT 130, SIGTERM 143. */
  SIGNAL_BASE: 128,
} as const;

/** The exit status for a VM (or disk image) that could not be started, by whose problem it is. */
export function exitCodeForFailure(failure: "options" | "input" | "host" | "internal"): number {
  return { options: ExitCode.USAGE, input: ExitCode.BAD_INPUT, host: ExitCode.HOST, internal: ExitCode.INTERNAL }[failure];
}

/** The signals the CLI stops a VM for, and the status each ends tskvm with (128 + N). */
export const STOP_SIGNALS = { SIGHUP: 1, SIGINT: 2, SIGTERM: 15 } as const;
export type StopSignal = keyof typeof STOP_SIGNALS;

export function signalExitCode(signal: StopSignal): number {
  return ExitCode.SIGNAL_BASE + STOP_SIGNALS[signal];
}
