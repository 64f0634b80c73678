/**
 * The data set of one incoming DIMSE message, delivered fragment by fragment as P-DATA arrives.
 * The association pauses the socket while more than `highWaterMark` bytes wait for the consumer,
 * so a slow consumer (a spool write, an upload) slows the peer instead of growing memory.
 */

/** What a queued fragment costs besides its bytes, so that tiny fragments reach the high-water mark too. */
const FRAGMENT_OVERHEAD = 64;

export class DatasetStream implements AsyncIterable<Uint8Array> {
  private queue: Uint8Array[] = [];
  private queued = 0;
  private ended = false;
  private error: Error | undefined;
  private waiter: (() => void) | undefined;
  private discarding = false;
  /** Whether this stream has paused the flow: pause and resume are called once each, whatever the fragment count. */
  private paused = false;
  /** Total bytes received for this data set so far. */
  received = 0;

  constructor(
    private readonly flow: { pause(): void; resume(): void },
    private readonly highWaterMark = 1 << 20,
  ) {}

  /** Called by the association for each data set PDV. */
  push(fragment: Uint8Array): void {
    this.received += fragment.length;
    // Empty fragments carry nothing and would pile up without ever reaching the high-water mark.
    if (this.discarding || this.ended || fragment.length === 0) return;
    this.queue.push(fragment);
    this.queued += fragment.length + FRAGMENT_OVERHEAD;
    if (this.queued > this.highWaterMark) this.pauseFlow();
    this.wake();
  }

  /** Called by the association after the last fragment. */
  end(): void {
    this.ended = true;
    this.wake();
  }

  /** Called by the association when the data set can never complete (abort, close, protocol error). */
  fail(err: Error): void {
    if (this.ended) return;
    this.error = err;
    this.ended = true;
    this.queue = [];
    this.queued = 0;
    this.resumeFlow();
    this.wake();
  }

  get isComplete(): boolean {
    return this.ended && !this.error;
  }

  /** True while the consumer waits for bytes from the peer (used by the idle timer). */
  get isWaitingForPeer(): boolean {
    return this.waiter !== undefined;
  }

  /** Drops whatever is still to come (a handler that answered without reading the whole data set). */
  discard(): void {
    this.discarding = true;
    this.queue = [];
    this.queued = 0;
    this.resumeFlow();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Uint8Array> {
    for (;;) {
      const next = this.queue.shift();
      if (next) {
        this.queued -= next.length + FRAGMENT_OVERHEAD;
        if (this.queued <= this.highWaterMark / 2) this.resumeFlow();
        yield next;
        continue;
      }
      if (this.error) throw this.error;
      if (this.ended) return;
      await new Promise<void>((resolve) => (this.waiter = resolve));
    }
  }

  /** Reads the whole data set; fails when it exceeds `limit` bytes (for small identifiers, never for images). */
  async readAll(limit: number): Promise<Uint8Array> {
    const parts: Uint8Array[] = [];
    let n = 0;
    for await (const p of this) {
      n += p.length;
      // Tiny fragments are charged their overhead too: a million 1-byte fragments must not pass as 1 MB.
      if (n + parts.length * FRAGMENT_OVERHEAD > limit) {
        this.discard();
        throw new RangeError(`data set larger than ${limit} bytes`);
      }
      parts.push(p);
    }
    const out = new Uint8Array(n);
    let o = 0;
    for (const p of parts) {
      out.set(p, o);
      o += p.length;
    }
    return out;
  }

  private pauseFlow(): void {
    if (this.paused) return;
    this.paused = true;
    this.flow.pause();
  }

  private resumeFlow(): void {
    if (!this.paused) return;
    this.paused = false;
    this.flow.resume();
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }
}
