/**
 * The API's errors. Every error a Vm method or startVm() rejects with is a VmError; the
 * subclasses say what went wrong in a way a program can act on (instanceof and fields),
 * and their messages are one line, fit for a user.
 */
import type { VmExit } from "./types";

export class VmError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/**
 * Why a VM could not be started:
 * - "options": an option is wrong or impossible (bad size, too many vCPUs, bad MAC, ...)
 * - "input": a file named in the options cannot be used (missing, not a kernel, locked disk,
 *   the default guest failed to build)
 * - "host": this host cannot run the VM (no /dev/kvm, no permission, a missing capability,
 *   no CAP_NET_ADMIN for a TAP)
 * - "internal": a bug in tskvm
 */
export type VmStartFailure = "options" | "input" | "host" | "internal";

export class VmStartError extends VmError {
  constructor(
    readonly failure: VmStartFailure,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** What a timed-out wait was waiting for. */
export type VmWait = "ready" | "console" | "command" | "poweroff";

/**
 * A wait ran out of time. After a command times out (waitingFor "command") the VM has been
 * stopped: the guest's state is unknown and its agent is still busy with the command.
 */
export class VmTimeoutError extends VmError {
  constructor(
    readonly waitingFor: VmWait,
    readonly timeoutMs: number,
    message: string,
  ) {
    super(message);
  }
}

/** The VM ended (the guest powered off, reset or failed, or it was stopped) during a wait. */
export class VmExitedError extends VmError {
  constructor(
    readonly waitingFor: VmWait,
    readonly exit: VmExit,
    message: string,
  ) {
    super(message);
  }
}

/** The guest agent cannot be used: the VM was started without it (agent: false). */
export class GuestAgentError extends VmError {}
