/** Polling in tests: wait for a condition that becomes true asynchronously (a log line, a drained spool, a metric). */

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Polls `f` every `everyMs` until it holds; false when it still does not after `timeoutMs`. */
export async function waitFor(f: () => boolean | Promise<boolean>, timeoutMs: number, everyMs = 50): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!(await f())) {
    if (Date.now() > deadline) return false;
    await sleep(everyMs);
  }
  return true;
}

/** Polls `f` until it holds; throws "timed out waiting until <what>" after `timeoutMs`. */
export async function until(what: string, f: () => boolean | Promise<boolean>, timeoutMs = 10_000, everyMs = 50): Promise<void> {
  if (!(await waitFor(f, timeoutMs, everyMs))) throw new Error(`timed out waiting until ${what}`);
}
