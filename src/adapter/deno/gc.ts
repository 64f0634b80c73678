/**
 * Garbage collection on request for Deno: V8 exposes gc() only when started with
 * `--v8-flags=--expose-gc`; without it the collector is left to its own schedule.
 */
export function collectGarbage(): void {
  (globalThis as { gc?: () => void }).gc?.();
}
