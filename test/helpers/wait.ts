/**
 * Waiting for a sign of readiness: poll a condition until it holds or a (generous) deadline
 * passes. Tests never sleep a fixed time and hope that something is ready by then.
 */

/** Resolves once `condition()` is true; rejects after `timeoutMs` with `what` in the message. */
export async function waitUntil(condition: () => boolean | Promise<boolean>, timeoutMs: number, what: string, pollMs = 50): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await condition()) return;
    if (Date.now() >= deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, pollMs));
  }
}
