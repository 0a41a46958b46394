/**
 * SIGINT, SIGTERM and SIGHUP for the project's scripts (test runner, harness VM): the
 * first one aborts `abort` (which stops what the script started) and is remembered, so
 * that the script can end with 128+N as a shell would report it.
 */
const NUMBERS = { SIGHUP: 1, SIGINT: 2, SIGTERM: 15 } as const;
export type StopSignal = keyof typeof NUMBERS;

export interface Stopper {
  abort: AbortController;
  /** The first signal received, if any. */
  signal(): StopSignal | undefined;
  /** 128 + the signal's number. */
  exitCode(): number;
}

export function catchStopSignals(onSignal?: (s: StopSignal) => void): Stopper {
  const abort = new AbortController();
  let received: StopSignal | undefined;
  for (const s of Object.keys(NUMBERS) as StopSignal[]) {
    process.on(s, () => {
      received ??= s;
      abort.abort();
      onSignal?.(s);
    });
  }
  return { abort, signal: () => received, exitCode: () => 128 + (received === undefined ? 0 : NUMBERS[received]) };
}
