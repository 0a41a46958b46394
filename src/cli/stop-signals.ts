/**
 * SIGINT, SIGTERM and SIGHUP, caught from tskvm's first line of JavaScript (bin/tskvm
 * installs this before it loads anything else), so that a signal at any point of start-up
 * ends tskvm with 128+N and leaves nothing behind. Until a command registers a listener
 * (before it creates anything that needs undoing: a VM, a TAP, a temp file) a signal ends
 * the process at once; afterwards the listeners stop what they started and the command
 * returns 128+N itself.
 */
import { STOP_SIGNALS, signalExitCode, type StopSignal } from "./exit-codes";

type Listener = (signal: StopSignal) => void;

let received: StopSignal | undefined;
const listeners = new Set<Listener>();
let installed = false;

export function catchStopSignals(): void {
  if (installed) return;
  installed = true;
  for (const s of Object.keys(STOP_SIGNALS) as StopSignal[]) {
    process.on(s, () => {
      received ??= s;
      if (listeners.size === 0) {
        process.stderr.write(`tskvm: stopped by ${s}\n`);
        process.exit(signalExitCode(s));
      }
      for (const l of [...listeners]) l(s);
    });
  }
}

/** The first stop signal received, if any. */
export function stopSignal(): StopSignal | undefined {
  return received;
}

/**
 * Call `fn` on a stop signal, or right away if one has come already, until the returned
 * function is called. While any listener is registered a signal no longer ends the process.
 */
export function onStopSignal(fn: Listener): () => void {
  catchStopSignals();
  listeners.add(fn);
  if (received !== undefined) fn(received);
  return () => {
    listeners.delete(fn);
  };
}
