/**
 * How many spooled instances are uploaded to Orthanc at once, adapted to what the link and Orthanc take
 * (issue 18): over a WAN one upload mostly waits a round trip, so more run at once until the link is
 * full; on the loopback Orthanc's CPU is the limit and more only queue.
 *
 * A hill climb on measured throughput, in windows of completed uploads (at least 8 and twice the limit,
 * at least 200 ms), counted only while uploads actually waited for a free slot (else the limit was not
 * what held them back, and the window says nothing about it):
 *  - probe: the limit grows by a quarter (at least 1) while each step raises throughput by 10% or more;
 *    a step that does not goes back to the limit before it, which is then held for 4 windows before
 *    probing again;
 *  - latency: a window whose median upload time is over twice the least seen (uploads queue at Orthanc or
 *    on the link) without more throughput than before lowers the limit by 1;
 *  - errors (a timeout, Orthanc unreachable or overloaded): the limit is halved at once.
 * Always within [min, max] (`Gateway.Orthanc.UploadConcurrency`, `Gateway.Orthanc.MaxUploadConcurrency`).
 */

export interface UploadConcurrencyOptions {
  min: number;
  max: number;
  /** Clock in ms (tests). */
  now?: () => number;
}

/** A window: uploads completed, their bytes and times, and how long uploads waited for a slot. */
interface Window {
  start: number;
  count: number;
  bytes: number;
  latencies: number[];
  waitingMs: number;
}

const GROWTH = 1.1;
const LATENCY_FACTOR = 2;
const HOLD_WINDOWS = 4;
const MIN_WINDOW_MS = 200;
const MIN_WINDOW_UPLOADS = 8;

export class UploadConcurrency {
  limit: number;
  readonly min: number;
  readonly max: number;
  private readonly now: () => number;
  private w: Window;
  private waitingSince: number | undefined;
  /** The limit and throughput (bytes/s) a probe started from; undefined before the first full window. */
  private base: { limit: number; rate: number } | undefined;
  private hold = 0;
  /** The least window median upload time seen (ms), slowly forgotten. */
  private leastLatency = Infinity;
  /** Why the limit last changed (for /status and the log). */
  lastChange: string | undefined;

  constructor(opts: UploadConcurrencyOptions) {
    this.min = Math.max(1, opts.min);
    this.max = Math.max(this.min, opts.max);
    this.limit = this.min;
    this.now = opts.now ?? (() => performance.now());
    this.w = this.fresh(this.now());
  }

  /** Whether uploads are waiting for a free slot now; tell it whenever that may have changed. */
  setWaiting(waiting: boolean): void {
    const now = this.now();
    if (waiting && this.waitingSince === undefined) this.waitingSince = now;
    else if (!waiting && this.waitingSince !== undefined) {
      this.w.waitingMs += now - this.waitingSince;
      this.waitingSince = undefined;
    }
  }

  /** An upload ended well: its bytes and how long it held its slot. */
  done(bytes: number, ms: number): void {
    const w = this.w;
    w.count++;
    w.bytes += bytes;
    w.latencies.push(ms);
    const now = this.now();
    if (w.count >= Math.max(MIN_WINDOW_UPLOADS, 2 * this.limit) && now - w.start >= MIN_WINDOW_MS) this.closeWindow(now);
  }

  /** An upload failed because of Orthanc or the link (a timeout, unreachable, 5xx): halve at once. */
  failed(): void {
    const next = Math.max(this.min, Math.floor(this.limit / 2));
    if (next !== this.limit) this.change(next, "errors");
    this.base = undefined;
    this.hold = HOLD_WINDOWS;
    this.w = this.fresh(this.now());
  }

  private closeWindow(now: number): void {
    const w = this.w;
    if (this.waitingSince !== undefined) {
      w.waitingMs += now - this.waitingSince;
      this.waitingSince = now;
    }
    const elapsed = now - w.start;
    const rate = (w.bytes / elapsed) * 1000;
    const latency = median(w.latencies);
    // Slowly forgotten (2% a window), so that a link that became slower for good sets a new baseline.
    this.leastLatency = Math.min(this.leastLatency * 1.02, latency);
    this.w = this.fresh(now);
    // Uploads did not wait for slots most of the window: the limit held nothing back.
    if (w.waitingMs < elapsed / 2) return;
    const base = this.base;
    const queueing = latency > LATENCY_FACTOR * this.leastLatency;
    if (base && base.limit < this.limit) {
      // The window after a probe step: keep the step only if throughput grew.
      if (rate >= base.rate * GROWTH && !(queueing && rate < base.rate * GROWTH * GROWTH)) return this.probe(rate, "throughput grew");
      this.hold = HOLD_WINDOWS;
      this.base = { limit: base.limit, rate: Math.max(base.rate, rate) };
      return this.change(base.limit, "no throughput gain");
    }
    if (queueing && (!base || rate <= base.rate * GROWTH) && this.limit > this.min) {
      const next = Math.max(this.min, Math.floor((this.limit * 3) / 4));
      this.hold = HOLD_WINDOWS;
      this.base = { limit: next, rate };
      return this.change(next, "latency rose without throughput");
    }
    if (this.hold > 0) {
      this.hold--;
      this.base = { limit: this.limit, rate: Math.max(rate, base?.rate ?? 0) };
      return;
    }
    this.probe(rate, base ? "probing" : "first window");
  }

  /** Starts a step up from the current limit, measured at `rate`. */
  private probe(rate: number, why: string): void {
    this.base = { limit: this.limit, rate };
    if (this.limit >= this.max) return;
    this.change(Math.min(this.max, this.limit + Math.max(1, Math.floor(this.limit / 4))), why);
  }

  private change(limit: number, why: string): void {
    this.limit = limit;
    this.lastChange = why;
  }

  private fresh(now: number): Window {
    return { start: now, count: 0, bytes: 0, latencies: [], waitingMs: 0 };
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? 0 : s[Math.floor(s.length / 2)]!;
}
