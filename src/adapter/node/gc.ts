/** Garbage collection on request for Node: gc() exists only with `--expose-gc`; otherwise nothing happens. */
export function collectGarbage(): void {
  (globalThis as { gc?: () => void }).gc?.();
}
