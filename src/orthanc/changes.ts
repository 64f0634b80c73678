/**
 * Orthanc's change log (GET /changes) as the signal that lets the gateway's caches follow Orthanc.
 *
 * Orthanc removes a deleted resource's entries from its change log and writes no "Deleted" change (seen
 * with 1.12.7): a deletion shows only when the resource is created again. So the feed reports creations
 * (NewPatient, NewStudy, NewSeries) with their sequence numbers; a cache that learned something about a
 * resource at sequence S knows it is stale once the resource was created after S. A log that starts over
 * (its Last below what was already seen: a new database behind the same URL) resets every cache.
 *
 * Polling: in the background every `intervalMs`, and on demand with sync(), which resolves once a poll
 * that started after the call has finished (concurrent callers share one poll).
 */
import type { ResourceLevel } from "../config/types.ts";
import type { OrthancApi } from "./nodes.ts";

interface ChangesAnswer {
  Changes: { ChangeType: string; ResourceType: string; ID: string; Seq: number }[];
  Done: boolean;
  Last: number;
}

export interface ChangesListener {
  /** A resource was created (or created again after a deletion) at sequence `seq`. */
  created?(level: ResourceLevel, id: string, seq: number): void;
  /** Orthanc's log started over: everything cached about Orthanc is stale. */
  reset?(): void;
}

const CREATED: Record<string, ResourceLevel> = { NewPatient: "Patient", NewStudy: "Study", NewSeries: "Series" };
/** Changes asked for per call (Orthanc's own maximum is 10000). */
const PAGE = 1000;
/** Creation sequence numbers remembered (per resource ID, oldest forgotten first). */
const REMEMBERED = 100_000;

export class ChangesFeed {
  /** The last sequence number seen; -1 before the first poll. */
  lastSeq = -1;
  private readonly createdAt = new Map<string, number>();
  private readonly listeners: ChangesListener[] = [];
  private current: Promise<void> | undefined;
  private next: Promise<void> | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private running = false;
  /** When (performance.now()) the latest poll that finished had started. */
  private finishedPollStart = -Infinity;

  constructor(
    private readonly client: OrthancApi,
    private readonly intervalMs = 2000,
  ) {}

  addListener(l: ChangesListener): void {
    this.listeners.push(l);
  }

  /** Polls every intervalMs until stop() (failures are retried at the next tick). */
  start(): void {
    if (this.running) return;
    this.running = true;
    const tick = () => {
      this.timer = undefined;
      if (!this.running) return;
      this.sync()
        .catch(() => {})
        .finally(() => {
          if (!this.running) return;
          this.timer = setTimeout(tick, this.intervalMs);
          (this.timer as { unref?: () => void }).unref?.();
        });
    };
    tick();
  }

  stop(): void {
    this.running = false;
    clearTimeout(this.timer);
    this.timer = undefined;
  }

  /** Whether the resource was created (again) after sequence `seq`, as far as the last poll knows. */
  createdSince(id: string, seq: number): boolean {
    const at = this.createdAt.get(id);
    return at !== undefined && at > seq;
  }

  /**
   * Resolves once a poll that started at or after `t` (performance.now()) has finished — at once if one has:
   * callers that need the log as of one event (an upload) share one poll.
   */
  syncSince(t: number): Promise<void> {
    return this.finishedPollStart >= t ? Promise.resolve() : this.sync();
  }

  /** Resolves once a poll that started after this call has finished; rejects with its OrthancError. */
  sync(): Promise<void> {
    if (!this.current) {
      this.current = this.poll().finally(() => {
        this.current = undefined;
      });
      return this.current;
    }
    // The poll under way may have started before the caller's event: wait for the one after it.
    if (!this.next) {
      this.next = this.current
        .catch(() => {})
        .then(() => {
          this.next = undefined;
          return this.sync();
        });
    }
    return this.next;
  }

  private async poll(): Promise<void> {
    const started = performance.now();
    await this.pollOnce();
    this.finishedPollStart = Math.max(this.finishedPollStart, started);
  }

  private async pollOnce(): Promise<void> {
    if (this.lastSeq < 0) {
      // Start from now: caches are empty, what happened before does not matter.
      const a = await this.client.getJson<ChangesAnswer>("/changes?last");
      this.lastSeq = a.Last;
      return;
    }
    for (;;) {
      const a = await this.client.getJson<ChangesAnswer>(`/changes?since=${this.lastSeq}&limit=${PAGE}`);
      if (a.Last < this.lastSeq) {
        // A new database behind the same URL.
        this.lastSeq = a.Last;
        this.createdAt.clear();
        for (const l of this.listeners) l.reset?.();
        return;
      }
      for (const c of a.Changes) {
        const level = CREATED[c.ChangeType];
        if (!level) continue;
        this.createdAt.delete(c.ID);
        if (this.createdAt.size >= REMEMBERED) this.createdAt.delete(this.createdAt.keys().next().value!);
        this.createdAt.set(c.ID, c.Seq);
        for (const l of this.listeners) l.created?.(level, c.ID, c.Seq);
      }
      this.lastSeq = Math.max(this.lastSeq, a.Last);
      if (a.Done || a.Changes.length === 0) return;
    }
  }
}
