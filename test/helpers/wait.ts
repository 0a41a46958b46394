/** Waiting in tests for a sign of readiness, with a deadline: never a fixed sleep. */

/** Resolves when `cond()` is true (checked every 20 ms); rejects after `timeoutMs` naming `what`. */
export async function waitUntil(what: string, cond: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
