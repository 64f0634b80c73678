/**
 * The process's file descriptors: how many are open and its limit (RLIMIT_NOFILE, soft), read from Linux's
 * /proc/self (node:fs, so the same in Bun, Deno and Node). Elsewhere, or when /proc/self cannot be read
 * (Deno without --allow-all), both are unknown and the callers do without.
 *
 * Why the gateway watches them: a listener that accepts until the process is out of descriptors takes them
 * from everything else — the Orthanc client, the spool — and Bun reports a connect() that failed for want of
 * a descriptor as ECONNREFUSED (and its fetch() ends the process), so exhaustion must never be reached
 * through DICOM connections, and must be named as what it is when it happens.
 */
import { readdirSync, readFileSync } from "node:fs";

/** The soft limit on open files (`Max open files` of /proc/self/limits), or undefined when unknown. */
export function fileDescriptorLimit(): number | undefined {
  try {
    const line = readFileSync("/proc/self/limits", "utf8")
      .split("\n")
      .find((l) => l.startsWith("Max open files"));
    const soft = line?.slice("Max open files".length).trim().split(/\s+/)[0];
    if (!soft || soft === "unlimited") return undefined;
    const n = Number(soft);
    return Number.isSafeInteger(n) && n > 0 ? n : undefined;
  } catch {
    return undefined;
  }
}

/** Descriptors open now (entries of /proc/self/fd, less the one the listing itself holds), or undefined. */
export function openFileDescriptors(): number | undefined {
  try {
    return Math.max(0, readdirSync("/proc/self/fd").length - 1);
  } catch {
    return undefined;
  }
}

/**
 * Whether the process is out of file descriptors now: true when fewer than `margin` are left, or when
 * listing them fails for want of one (EMFILE/ENFILE); undefined when it cannot be told. The limit is read
 * once and kept (reading it takes a descriptor too).
 */
export function fileDescriptorsExhausted(margin = 8): boolean | undefined {
  cachedLimit ??= fileDescriptorLimit() ?? null;
  try {
    const open = readdirSync("/proc/self/fd").length - 1;
    return cachedLimit === null ? undefined : open >= cachedLimit - margin;
  } catch (err) {
    return isFileDescriptorExhaustion(err) ? true : undefined;
  }
}
let cachedLimit: number | null | undefined;

/** Whether an error is the process (EMFILE) or the system (ENFILE) out of file descriptors. */
export function isFileDescriptorExhaustion(err: unknown): err is Error & { code: "EMFILE" | "ENFILE" } {
  const code = (err as { code?: unknown } | undefined)?.code;
  return code === "EMFILE" || code === "ENFILE";
}

/**
 * Descriptors left before the limit, for a caller that opens many (a listener): measured from /proc at most
 * every `remeasureMs` and, in between, estimated from the caller's own count of what it opened and closed
 * since, then measured again whenever the estimate comes within `reserve` of the limit. The reserve is
 * what the rest of the process may need (Orthanc connections, spool files, C-MOVE associations).
 */
export class FileDescriptorBudget {
  readonly limit: number | undefined;
  readonly reserve: number;
  private measuredAt = -Infinity;
  private openAtMeasure = 0;
  private trackedAtMeasure = 0;
  private readonly remeasureMs: number;
  private readonly measure: () => number | undefined;

  constructor(opts: { limit?: number; reserve?: number; remeasureMs?: number; measure?: () => number | undefined } = {}) {
    this.limit = opts.limit ?? fileDescriptorLimit();
    // An eighth of the limit, between 32 and 256 descriptors.
    this.reserve = opts.reserve ?? Math.min(256, Math.max(32, Math.floor((this.limit ?? 0) / 8)));
    this.remeasureMs = opts.remeasureMs ?? 250;
    this.measure = opts.measure ?? openFileDescriptors;
  }

  /**
   * How many more descriptors may be used before the reserve (negative: that many over), given the number
   * the caller holds now (`tracked`); undefined when the limit or the count is unknown.
   */
  headroom(tracked: number, now = Date.now()): number | undefined {
    if (this.limit === undefined) return undefined;
    const estimate = () => this.openAtMeasure + (tracked - this.trackedAtMeasure);
    const stale = now - this.measuredAt >= this.remeasureMs;
    if (stale || estimate() >= this.limit - this.reserve) {
      const open = this.measure();
      if (open === undefined) return undefined;
      this.openAtMeasure = open;
      this.trackedAtMeasure = tracked;
      this.measuredAt = now;
    }
    return this.limit - this.reserve - estimate();
  }
}
