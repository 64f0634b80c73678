/**
 * Repeated identical failures in the log: TLS handshakes that fail the same way, connections refused or
 * closed for the same reason. The first is logged at once; the identical ones after it within a window are
 * counted, and one line at the end of the window says how many there were (with the last one's fields).
 * The log stays readable under a flood of 3000 handshakes, and says how big the flood was. This is for the
 * log only: the audit trail keeps one line per event, always.
 */
import type { LogFields } from "../shared/log.ts";

interface Open {
  count: number;
  fields: LogFields;
  timer: ReturnType<typeof setTimeout>;
}

/** Keys held at once; past it, failures share one key per message (still counted, still logged once per window). */
const MAX_KEYS = 256;

export class RepeatedLog {
  private readonly open = new Map<string, Open>();

  /** `windowMs`: how long identical lines are counted instead of written (default 10 s). */
  constructor(private readonly windowMs = 10_000) {}

  /**
   * Writes `msg` with `fields` through `write` unless an identical failure (same `key`) was written less than
   * the window ago; then counts it, and writes `msg (repeated)` with `repeated: N` when the window ends.
   */
  log(key: string, msg: string, fields: LogFields, write: (msg: string, fields: LogFields) => void): void {
    const k = this.open.has(key) || this.open.size < MAX_KEYS ? key : `(many)\u0000${msg}`;
    const seen = this.open.get(k);
    if (seen) {
      seen.count++;
      seen.fields = fields;
      return;
    }
    write(msg, fields);
    const entry: Open = {
      count: 0,
      fields,
      timer: setTimeout(() => {
        this.open.delete(k);
        if (entry.count > 0) write(`${msg} (repeated)`, { ...entry.fields, repeated: entry.count, withinSeconds: this.windowMs / 1000 });
      }, this.windowMs),
    };
    (entry.timer as { unref?: () => void }).unref?.();
    this.open.set(k, entry);
  }

  /** Stops counting; lines still counted are dropped (the process is stopping). */
  close(): void {
    for (const o of this.open.values()) clearTimeout(o.timer);
    this.open.clear();
  }
}
