/**
 * Forwards spooled instances to Orthanc: upload (streamed), label, optionally verify, then delete
 * the spool entry — in that order, so a crash at any point leaves the entry to be replayed (Orthanc
 * answers AlreadyStored to a replay, and labels are idempotent).
 *
 * Bounded parallelism over keep-alive connections; transient failures back off exponentially with
 * jitter, per entry; when Orthanc is unreachable every worker pauses together (one probe at a time
 * instead of hammering), and wake() resumes at once when the monitor sees Orthanc again.
 */
import type { TenantConfig } from "../config/types.ts";
import { OrthancError, type OrthancClient } from "../orthanc/client.ts";
import { isPermanentRejection, storedAttachmentInfo, uploadFile, type Labeler, type StoredInstance } from "../orthanc/store.ts";
import type { SpoolEntry, TenantSpool } from "./spool.ts";

export interface ForwarderEvents {
  forwarded?(tenant: TenantConfig, entry: SpoolEntry, seconds: number, stored: StoredInstance): void;
  failed?(tenant: TenantConfig, entry: SpoolEntry, error: Error, attempt: number, retryInMs: number): void;
  quarantined?(tenant: TenantConfig, entry: SpoolEntry, reason: string): void;
}

export interface ForwarderOptions {
  orthanc: OrthancClient;
  labeler: Labeler;
  concurrency: number;
  verifyIntegrity: boolean;
  events?: ForwarderEvents;
  /** Backoff of one entry after a transient failure: base * 2^(attempt-1), capped, with ±50% jitter. */
  backoffBaseMs?: number;
  backoffMaxMs?: number;
}

interface Job {
  tenant: TenantConfig;
  spool: TenantSpool;
  entry: SpoolEntry;
  attempt: number;
  notBefore: number;
}

export function backoffDelay(attempt: number, baseMs: number, maxMs: number, random = Math.random): number {
  const exp = Math.min(maxMs, baseMs * 2 ** Math.max(0, attempt - 1));
  return Math.round(exp * (0.5 + random()));
}

export class Forwarder {
  private readonly jobs: Job[] = [];
  private inFlight = 0;
  private running = false;
  private workers: Promise<void>[] = [];
  private wakeUp: (() => void) | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  /** Orthanc unreachable: nobody starts a job before this time (except the single probe). */
  private pausedUntil = 0;
  private pauseAttempt = 0;
  private idleWaiters: (() => void)[] = [];
  private readonly baseMs: number;
  private readonly maxMs: number;

  constructor(private readonly opts: ForwarderOptions) {
    this.baseMs = opts.backoffBaseMs ?? 500;
    this.maxMs = opts.backoffMaxMs ?? 30_000;
  }

  add(tenant: TenantConfig, spool: TenantSpool, entry: SpoolEntry): void {
    this.jobs.push({ tenant, spool, entry, attempt: 0, notBefore: 0 });
    this.signal();
  }

  /** Entries waiting or being forwarded. */
  get backlog(): number {
    return this.jobs.length + this.inFlight;
  }

  start(): void {
    if (this.running) return;
    this.running = true;
    for (let i = 0; i < this.opts.concurrency; i++) this.workers.push(this.work());
  }

  /** Stops taking new jobs and waits for the uploads under way. Pending entries stay in the spool. */
  async stop(): Promise<void> {
    this.running = false;
    this.signal();
    await Promise.all(this.workers);
    this.workers = [];
  }

  /** Orthanc is back: retry everything now. */
  wake(): void {
    this.pausedUntil = 0;
    this.pauseAttempt = 0;
    for (const j of this.jobs) j.notBefore = 0;
    this.signal();
  }

  /** Resolves when nothing is waiting or being forwarded. */
  idle(): Promise<void> {
    if (this.backlog === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  private signal(): void {
    const w = this.wakeUp;
    this.wakeUp = undefined;
    w?.();
  }

  private next(now: number): Job | undefined {
    if (now < this.pausedUntil) return undefined;
    const i = this.jobs.findIndex((j) => j.notBefore <= now);
    if (i < 0) return undefined;
    const [job] = this.jobs.splice(i, 1);
    // While paused for an outage, the job that gets through is the probe: hold the others back.
    if (this.pauseAttempt > 0) this.pausedUntil = Number.MAX_SAFE_INTEGER;
    return job;
  }

  private async sleepUntilWork(): Promise<void> {
    const now = Date.now();
    const times = this.jobs.map((j) => Math.max(j.notBefore, this.pausedUntil === Number.MAX_SAFE_INTEGER ? Infinity : this.pausedUntil));
    const soonest = Math.min(...times);
    await new Promise<void>((resolve) => {
      const prev = this.wakeUp;
      this.wakeUp = () => {
        prev?.();
        resolve();
      };
      if (Number.isFinite(soonest)) {
        clearTimeout(this.timer);
        this.timer = setTimeout(() => this.signal(), Math.max(1, soonest - now));
        (this.timer as { unref?: () => void }).unref?.();
      }
    });
  }

  private async work(): Promise<void> {
    while (this.running) {
      const job = this.next(Date.now());
      if (!job) {
        if (this.backlog === 0) this.idleWaiters.splice(0).forEach((r) => r());
        await this.sleepUntilWork();
        continue;
      }
      this.inFlight++;
      try {
        await this.forward(job);
      } finally {
        this.inFlight--;
      }
    }
  }

  private async forward(job: Job): Promise<void> {
    const { tenant, spool, entry } = job;
    const started = performance.now();
    job.attempt++;
    try {
      const stored = await uploadFile(this.opts.orthanc, entry.file, entry.size);
      if (this.opts.verifyIntegrity && stored.status === "Success") {
        const got = await storedAttachmentInfo(this.opts.orthanc, stored.id);
        if (got.md5 !== entry.md5 || got.size !== entry.size) {
          const reason = `integrity check failed: Orthanc stored ${got.size} bytes with MD5 ${got.md5}, the gateway received ${entry.size} bytes with MD5 ${entry.md5}`;
          await spool.quarantine(entry, reason);
          this.opts.events?.quarantined?.(tenant, entry, reason);
          return;
        }
      }
      await this.opts.labeler.apply(stored, tenant);
      await spool.remove(entry);
      this.outageOver();
      this.opts.events?.forwarded?.(tenant, entry, (performance.now() - started) / 1000, stored);
    } catch (e) {
      const err = e instanceof Error ? e : new Error(String(e));
      if (isPermanentRejection(err)) {
        this.outageOver();
        const reason = `Orthanc refused the instance: ${err.message}`;
        try {
          await spool.quarantine(entry, reason);
          this.opts.events?.quarantined?.(tenant, entry, reason);
          return;
        } catch (qe) {
          // Could not move it aside: keep it queued rather than lose it.
          this.requeue(job, qe instanceof Error ? qe : new Error(String(qe)));
          return;
        }
      }
      if (err instanceof OrthancError && (err.kind === "unreachable" || err.kind === "timeout")) {
        this.pauseAttempt++;
        this.pausedUntil = Date.now() + backoffDelay(this.pauseAttempt, this.baseMs, this.maxMs);
        job.attempt--; // an outage is not this instance's fault
        this.jobs.unshift(job);
        this.opts.events?.failed?.(tenant, entry, err, job.attempt + 1, this.pausedUntil - Date.now());
        this.signal();
        return;
      }
      this.outageOver();
      this.requeue(job, err);
    }
  }

  private requeue(job: Job, err: Error): void {
    const delay = backoffDelay(job.attempt, this.baseMs, this.maxMs);
    job.notBefore = Date.now() + delay;
    this.jobs.push(job);
    this.opts.events?.failed?.(job.tenant, job.entry, err, job.attempt, delay);
    this.signal();
  }

  private outageOver(): void {
    if (this.pauseAttempt === 0) return;
    this.pauseAttempt = 0;
    this.pausedUntil = 0;
    this.signal();
  }
}
