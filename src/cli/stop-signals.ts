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

interface StopState {
  received: StopSignal | undefined;
  listeners: Set<Listener>;
  installed: boolean;
}

/**
 * Kept on globalThis, not in this module: bin/tskvm loads this file from dist/src before
 * the one-file bundle (dist/tskvm.js) is read, and the bundle has its own copy of the
 * module; both must see the same signal and listeners.
 */
const STATE_KEY = Symbol.for("tskvm.stopSignals");
const state: StopState = ((globalThis as Record<symbol, unknown>)[STATE_KEY] as StopState | undefined) ??
  ((globalThis as Record<symbol, unknown>)[STATE_KEY] = { received: undefined, listeners: new Set<Listener>(), installed: false } satisfies StopState) as StopState;
const listeners = state.listeners;

export function catchStopSignals(): void {
  if (state.installed) return;
  state.installed = true;
  for (const s of Object.keys(STOP_SIGNALS) as StopSignal[]) {
    process.on(s, () => {
      state.received ??= s;
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
  return state.received;
}

/**
 * Call `fn` on a stop signal, or right away if one has come already, until the returned
 * function is called. While any listener is registered a signal no longer ends the process.
 */
export function onStopSignal(fn: Listener): () => void {
  catchStopSignals();
  listeners.add(fn);
  if (state.received !== undefined) fn(state.received);
  return () => {
    listeners.delete(fn);
  };
}
