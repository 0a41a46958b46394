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
 * - "stopped": the `signal` option was aborted during start-up; nothing is left running
 * - "internal": a bug in tskvm
 */
export type VmStartFailure = "options" | "input" | "host" | "stopped" | "internal";

/** The options a message can be about: VmOptions fields ("nics.hostCidr": a NIC's hostCidr). */
export type OptionName =
  | "kernel"
  | "initrd"
  | "modules"
  | "memory"
  | "cpus"
  | "disks"
  | "nics"
  | "nics.mac"
  | "nics.hostCidr"
  | "guestIp"
  | "net"
  | "forwards"
  | "entry"
  | "cpuTemplate"
  | "restore"
  | "shares"
  | "rootfs"
  | "ioEngine";

/**
 * How a message names an option. The API names them by their VmOptions field; a caller
 * with other names for them (the CLI: its flags) renders the message again with its own.
 */
export type OptionNames = (option: OptionName) => string;
export const API_OPTION_NAMES: OptionNames = (option) => option;

/** A message about an option, to be rendered with whichever names the reader knows. */
export type OptionMessage = (names: OptionNames) => string;

export class VmStartError extends VmError {
  /** The option at fault, when one is: `message` names it the API's way, render() any way. */
  readonly option: OptionName | undefined;
  private readonly renderWith: OptionMessage | undefined;

  constructor(
    readonly failure: VmStartFailure,
    message: string | OptionMessage,
    options?: { cause?: unknown; option?: OptionName },
  ) {
    super(typeof message === "string" ? message : message(API_OPTION_NAMES), options);
    this.option = options?.option;
    this.renderWith = typeof message === "string" ? undefined : message;
  }

  /** The message with options named by `names` (the CLI's flags, say). */
  render(names: OptionNames): string {
    return this.renderWith === undefined ? this.message : this.renderWith(names);
  }
}

/** What a timed-out wait was waiting for. */
export type VmWait = "ready" | "console" | "command" | "poweroff" | "pause";

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

/**
 * A snapshot could not be taken: "state" (the VM cannot be snapshotted now: it ended, a
 * command is running, a device cannot be saved), "unwritable" (the directory), or another
 * SnapshotErrorKind. The VM keeps running as it was.
 */
export class VmSnapshotError extends VmError {
  constructor(
    readonly kind: string,
    message: string,
    /** Another writer completed the same snapshot directory first: its snapshot is there. */
    readonly raced = false,
  ) {
    super(message);
  }
}
