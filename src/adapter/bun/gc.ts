/** Garbage collection on request for Bun: a synchronous full collection (Bun.gc(true)). */
interface BunGc {
  gc(synchronous: boolean): void;
}

export function collectGarbage(): void {
  (globalThis as unknown as { Bun?: BunGc }).Bun?.gc(true);
}
