/**
 * Forwards spooled instances to Orthanc: upload (streamed when large) with the tenant's labels pipelined
 * behind it (one round trip: store.ts uploadLabeled), optionally verify, then delete the spool entry — in
 * that order, so a crash at any point leaves the entry to be replayed (Orthanc answers AlreadyStored to a
 * replay, and labels are idempotent).
 *
 * Parallel uploads over keep-alive connections, as many as the link and Orthanc take
 * (upload-concurrency.ts: between `concurrency` and `maxConcurrency`); transient failures back off
 * exponentially with jitter, per entry; when Orthanc is unreachable every worker pauses together (one
 * probe at a time instead of hammering), and wake() resumes at once when the monitor sees Orthanc again.
 *
 * Receive priority: while data sets are arriving (and for QUIET_MS after the last one), uploads wait,
 * so that a small box spends its CPU on acknowledging the modality first; an entry waits at most
 * `receivePriorityMs`, after which uploads go on one at a time until the arrivals stop. Not when the
 * uploads are bound by the link rather than by this box's CPU (OrthancClient.linkBound: Orthanc's round
 * trip is 2 ms or more): Orthanc does not run on this box, and an upload mostly waits on the link. Only
 * then does the number of uploads at once adapt: on the box of its Orthanc, more would only compete with
 * it for the CPU (`concurrency` stays).
 */
import type { TenantConfig } from "../config/types.ts";
import { OrthancError } from "../orthanc/client.ts";
import type { Labeler } from "../orthanc/labeler.ts";
import type { OrthancApi } from "../orthanc/nodes.ts";
import { isPermanentRejection, storedAttachmentInfo, storedIds, STREAM_ABOVE, uploadFile, uploadLabeled, type StoredInstance } from "../orthanc/store.ts";
import { TenantSpool, type SpoolEntry } from "./spool.ts";
import { DatasetRefusal, type InstanceIdentity } from "../dicom/dataset-reader.ts";
import { orthancIds } from "../orthanc/identity.ts";
import type { IsolationGuard } from "../tenancy/isolation.ts";
import { settleStrictUpload } from "../tenancy/strict-upload.ts";
import type { UidRegistry } from "../tenancy/ownership.ts";
import { readSpooledIdentity } from "./spooled-identity.ts";
import { UploadConcurrency } from "./upload-concurrency.ts";

/**
 * Why an acknowledged instance was set aside (a metric label; each one is worth an alert):
 * orthanc-refused — Orthanc refused its content for good (400, 413, 415);
 * unreadable — its data set is refused by the strict reader (only records written before 0.3, which did not
 *   check it before the acknowledgement);
 * isolation — Strict isolation refused it when forwarding (it was acknowledged while Orthanc was unreachable);
 * placement — Orthanc filed it elsewhere than the gateway checked (its reading of the data set differs);
 * integrity — Orthanc stored other bytes than were received (VerifyIntegrity).
 */
export type QuarantineKind = "orthanc-refused" | "unreadable" | "isolation" | "placement" | "integrity";

export interface ForwarderEvents {
  /** Strict isolation found, when forwarding, that the instance would land in another tenant's resources. */
  isolationRefused?(tenant: TenantConfig, entry: SpoolEntry, reason: string): void;
  forwarded?(tenant: TenantConfig, entry: SpoolEntry, seconds: number, stored: StoredInstance): void;
  failed?(tenant: TenantConfig, entry: SpoolEntry, error: Error, attempt: number, retryInMs: number): void;
  quarantined?(tenant: TenantConfig, entry: SpoolEntry, reason: string, kind: QuarantineKind): void;
  /** Orthanc filed an instance elsewhere than checked; `deleted`: the gateway undid its own upload. */
  misplaced?(tenant: TenantConfig, entry: SpoolEntry, reason: string, deleted: boolean): void;
}

/** What a watcher of the forwarder is told (e.g. Storage Commitment waiting for spooled instances). */
export type ForwardingWatcher = Pick<ForwarderEvents, "forwarded" | "quarantined">;

export interface ForwarderOptions {
  orthanc: OrthancApi;
  labeler: Labeler;
  /** Parallel uploads at start, and the fewest they are brought down to. */
  concurrency: number;
  /** The most parallel uploads (default: `concurrency`, i.e. not adapted). */
  maxConcurrency?: number;
  verifyIntegrity: boolean;
  events?: ForwarderEvents;
  /** The isolation guard of a Strict tenant (undefined for Shared). */
  guardFor?: (tenant: TenantConfig) => IsolationGuard | undefined;
  /** Where spooled instances hold their UIDs until they are in Orthanc (released here). */
  registry?: UidRegistry;
  /** Orthanc's `DefaultEncoding`, for reading the identity of records written before 0.3. */
  defaultEncoding: string;
  /** Backoff of one entry after a transient failure: base * 2^(attempt-1), capped, with ±50% jitter. */
  backoffBaseMs?: number;
  backoffMaxMs?: number;
  /** Longest an entry waits while instances are arriving (0: uploads never wait for arrivals). */
  receivePriorityMs?: number;
}

/** Arrivals this close together count as one burst (storescu sends the next instance within a millisecond or two). */
const QUIET_MS = 50;

interface Job {
  tenant: TenantConfig;
  spool: TenantSpool;
  entry: SpoolEntry;
  attempt: number;
  notBefore: number;
  /** Date.now() when it was queued (receive priority). */
  queuedAt: number;
}

/** The record carries what Orthanc files it by (records of 0.3 and later). */
function hasIdentity(entry: SpoolEntry): boolean {
  return entry.patientId !== undefined && !!entry.studyInstanceUid && !!entry.seriesInstanceUid;
}

export function backoffDelay(attempt: number, baseMs: number, maxMs: number, random = Math.random): number {
  const exp = Math.min(maxMs, baseMs * 2 ** Math.max(0, attempt - 1));
  return Math.round(exp * (0.5 + random()));
}

/** FIFO queue with O(1) push and shift (Array.prototype.shift is O(n) on large arrays). */
class Fifo<T> {
  private items: (T | undefined)[] = [];
  private head = 0;
  get length(): number {
    return this.items.length - this.head;
  }
  push(x: T): void {
    this.items.push(x);
  }
  unshift(x: T): void {
    if (this.head > 0) this.items[--this.head] = x;
    else this.items.unshift(x);
  }
  peek(): T | undefined {
    return this.items[this.head];
  }
  shift(): T | undefined {
    if (this.head >= this.items.length) return undefined;
    const x = this.items[this.head];
    this.items[this.head++] = undefined;
    if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return x;
  }
  *[Symbol.iterator](): Iterator<T> {
    for (let i = this.head; i < this.items.length; i++) yield this.items[i]!;
  }
}

export class Forwarder {
  /** Jobs that may start now, in arrival order. */
  private readonly ready = new Fifo<Job>();
  /** Jobs backing off after a failure (few), each with its notBefore. */
  private delayed: Job[] = [];
  private inFlight = 0;
  private running = false;
  private workers: Promise<void>[] = [];
  private sleepers: (() => void)[] = [];
  private timer: ReturnType<typeof setTimeout> | undefined;
  private timerAt = Infinity;
  /** Orthanc unreachable: nobody starts a job before this time; then one job probes. */
  private pausedUntil = 0;
  private pauseAttempt = 0;
  private probing = false;
  private idleWaiters: (() => void)[] = [];
  private readonly baseMs: number;
  private readonly maxMs: number;
  /** Data sets arriving now, and when the last one ended (receive priority). */
  private arriving = 0;
  private lastArrivalAt = 0;
  /** How many uploads run at once (adapted). */
  readonly concurrency: UploadConcurrency;
  private readonly watchers = new Set<ForwardingWatcher>();

  constructor(private readonly opts: ForwarderOptions) {
    this.baseMs = opts.backoffBaseMs ?? 500;
    this.maxMs = opts.backoffMaxMs ?? 30_000;
    this.concurrency = new UploadConcurrency({ min: opts.concurrency, max: opts.maxConcurrency ?? opts.concurrency });
  }

  /** Tells `w` of every instance forwarded or quarantined from now on, until the returned function is called. */
  watch(w: ForwardingWatcher): () => void {
    this.watchers.add(w);
    return () => void this.watchers.delete(w);
  }

  add(tenant: TenantConfig, spool: TenantSpool, entry: SpoolEntry): void {
    this.ready.push({ tenant, spool, entry, attempt: 0, notBefore: 0, queuedAt: Date.now() });
    this.wakeOne();
  }

  /** A C-STORE data set started arriving; arrivalEnded() when it is answered. */
  arrivalStarted(): void {
    this.arriving++;
  }

  arrivalEnded(): void {
    this.arriving = Math.max(0, this.arriving - 1);
    this.lastArrivalAt = Date.now();
    if (this.arriving === 0 && this.ready.length > 0 && this.sleepers.length > 0) this.wakeAt(this.lastArrivalAt + QUIET_MS, this.lastArrivalAt);
  }

  /** Whether uploads are waiting now because instances are arriving (receive priority). */
  get waitingForArrivals(): boolean {
    const oldest = this.ready.peek();
    const now = Date.now();
    return oldest !== undefined && this.deferredUntil(now, oldest) > now;
  }

  /** Until when uploads wait for arrivals (0: they need not), given the oldest waiting entry. */
  private deferredUntil(now: number, oldest: Job): number {
    const limit = this.opts.receivePriorityMs ?? 0;
    if (limit <= 0 || this.linkBound) return 0;
    const busyUntil = this.arriving > 0 ? Infinity : this.lastArrivalAt + QUIET_MS;
    if (now >= busyUntil) return 0;
    const overdueAt = oldest.queuedAt + limit;
    // Waited long enough: one upload at a time while arrivals go on.
    if (now >= overdueAt) return this.inFlight === 0 ? 0 : busyUntil;
    return Math.min(busyUntil, overdueAt);
  }

  /** Uploads are bound by the link, not by this box's CPU (OrthancClient.linkBound). */
  get linkBound(): boolean {
    return this.opts.orthanc.linkBound;
  }

  /** Uploads allowed at once now: adapted while link-bound, else `concurrency`. */
  get uploadLimit(): number {
    return this.linkBound ? this.concurrency.limit : this.concurrency.min;
  }

  /** Entries waiting or being forwarded. */
  get backlog(): number {
    return this.ready.length + this.delayed.length + this.inFlight;
  }

  start(): void {
    if (this.running) return;
    this.running = true;
    // One worker per possible slot; the adapted limit decides how many upload at once.
    for (let i = 0; i < this.concurrency.max; i++) this.workers.push(this.work());
  }

  /** Stops taking new jobs and waits for the uploads under way. Pending entries stay in the spool. */
  async stop(): Promise<void> {
    this.running = false;
    clearTimeout(this.timer);
    this.wakeAll();
    await Promise.all(this.workers);
    this.workers = [];
  }

  /** Orthanc is back: retry everything now. */
  wake(): void {
    this.pausedUntil = 0;
    this.pauseAttempt = 0;
    for (const j of this.delayed) this.ready.push(j);
    this.delayed = [];
    this.wakeAll();
  }

  /** Resolves when nothing is waiting or being forwarded. */
  idle(): Promise<void> {
    if (this.backlog === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  private wakeOne(): void {
    this.sleepers.pop()?.();
  }

  private wakeAll(): void {
    for (const w of this.sleepers.splice(0)) w();
  }

  private next(now: number): Job | undefined {
    if (this.probing || now < this.pausedUntil || this.inFlight >= this.uploadLimit) return undefined;
    if (this.delayed.length > 0) {
      const due = this.delayed.filter((j) => j.notBefore <= now);
      if (due.length > 0) {
        this.delayed = this.delayed.filter((j) => j.notBefore > now);
        for (const j of due) this.ready.push(j);
      }
    }
    const oldest = this.ready.peek();
    if (oldest && this.deferredUntil(now, oldest) > now) return undefined;
    const job = this.ready.shift();
    // During an outage the job that gets through is the probe: the others wait for its outcome.
    if (job && this.pauseAttempt > 0) this.probing = true;
    return job;
  }

  /** Sleeps until woken, or until the next delayed job, the end of a pause or of a receive-priority wait is due. */
  private sleep(now: number): Promise<void> {
    let at = this.probing ? Infinity : Math.max(now, this.pausedUntil);
    if (this.ready.length === 0) at = Math.max(at, Math.min(Infinity, ...this.delayed.map((j) => j.notBefore)));
    else if (!this.probing) {
      const deferred = this.deferredUntil(now, this.ready.peek()!);
      if (deferred > now) at = Math.max(at, deferred);
    }
    this.wakeAt(at, now);
    return new Promise((resolve) => this.sleepers.push(resolve));
  }

  /** Wakes every sleeper at `at` (one timer: the earliest wins). */
  private wakeAt(at: number, now: number): void {
    if (at === Infinity || at >= this.timerAt) return;
    clearTimeout(this.timer);
    this.timerAt = at;
    this.timer = setTimeout(() => {
      this.timerAt = Infinity;
      this.wakeAll();
    }, Math.max(1, at - now));
    (this.timer as { unref?: () => void }).unref?.();
  }

  private async work(): Promise<void> {
    while (this.running) {
      const now = Date.now();
      const job = this.next(now);
      if (!job) {
        if (this.backlog === 0) this.idleWaiters.splice(0).forEach((r) => r());
        await this.sleep(now);
        continue;
      }
      this.inFlight++;
      this.slotsChanged();
      try {
        await this.forward(job);
      } finally {
        this.inFlight--;
        this.slotsChanged();
      }
      if (this.backlog === 0) this.idleWaiters.splice(0).forEach((r) => r());
    }
  }

  /** Tells the concurrency how busy the slots are; wakes workers when the limit grew. */
  private slotsChanged(): void {
    const before = this.uploadLimit;
    this.concurrency.setWaiting(this.linkBound && this.ready.length > 0 && this.inFlight >= before);
    if (this.uploadLimit > before) this.wakeAll();
  }

  private async forward(job: Job): Promise<void> {
    const { tenant, spool, entry } = job;
    const started = performance.now();
    job.attempt++;
    try {
      const guard = this.opts.guardFor?.(tenant);
      // Strict isolation: nothing is uploaded that cannot be claimed in Orthanc right after (it would sit
      // there unowned); retried until Orthanc keeps the ownership records (the monitor's /ready reason).
      if (guard?.unusable) throw new OrthancError(guard.unusable, { kind: "http", status: 409 });
      // Where Orthanc will file it: the labels are pipelined there. A Shared tenant's record of 0.2 and older
      // carries no identity: it is not read from the data set for that, its labels follow the upload instead.
      const identity = guard || hasIdentity(entry) ? await this.identityOf(entry) : undefined;
      const ids = identity && orthancIds(identity);
      let instanceIsNew = entry.instanceIsNew === true;
      // Strict isolation: an instance acknowledged while Orthanc was unreachable is checked now.
      if (guard && identity && entry.isolation !== "checked") {
        const verdict = await guard.check(identity, entry.id);
        if (!verdict.ok) {
          const reason = `isolation: ${verdict.reason} (checked when forwarding: Orthanc was unreachable when the instance was acknowledged)`;
          await this.quarantine(job, "isolation", reason);
          this.opts.events?.isolationRefused?.(tenant, entry, reason);
          return;
        }
        instanceIsNew = verdict.instanceIsNew;
      }
      const labeler = this.opts.labeler;
      const verify = this.opts.verifyIntegrity;
      const source = entry.size <= STREAM_ABOVE ? await spool.read(entry) : entry;
      const plan = ids && labeler.plan(ids, tenant);
      // Strict: the labels wait for the ownership claim (settleStrictUpload), one more round trip. Across a
      // link the ownership records come back with the upload (a claim that holds needs no call of its own);
      // on Orthanc's own box, the change log's poll shared by every upload costs Orthanc less.
      const up = plan
        ? await uploadLabeled(this.opts.orthanc, labeler, source, plan, {
            attachment: verify,
            labelsLater: guard !== undefined,
            ...(guard && this.linkBound ? { reads: guard.recordReads(plan.ids) } : {}),
          })
        : { stored: await uploadFile(this.opts.orthanc, source), labeled: false };
      const stored = up.stored;
      const sent = async () => ({ size: entry.size, md5: entry.md5 ?? (await TenantSpool.md5Of(entry)) });
      if (guard && identity && plan) {
        const settlement = await settleStrictUpload({ orthanc: this.opts.orthanc, guard, labeler, identity, plan, up, instanceIsNew, sent });
        if (!settlement.ok) {
          if (settlement.kind === "placement") {
            this.opts.events?.misplaced?.(tenant, entry, settlement.reason, settlement.deleted);
            await this.quarantine(job, "placement", `isolation: ${settlement.reason}; ${settlement.deleted ? "the upload was undone" : "left in Orthanc as it was (not created by this upload)"}`);
            return;
          }
          const reason =
            settlement.kind === "replay"
              ? `isolation: Orthanc already holds other bytes (${settlement.held.size} bytes, MD5 ${settlement.held.md5}) under SOP Instance UID ${entry.sopInstanceUid}, stored by another writer after this instance was checked; left as it was, unlabeled by this tenant`
              : `isolation: ${settlement.reason}; ${settlement.deleted ? "the upload was undone" : "left in Orthanc as it was, unlabeled (not created by this upload)"}`;
          await this.quarantine(job, "isolation", reason);
          this.opts.events?.isolationRefused?.(tenant, entry, reason);
          return;
        }
        up.labeled = settlement.labeled;
      }
      if (verify && stored.status === "Success") {
        const got = ("attachment" in up ? up.attachment : undefined) ?? (await storedAttachmentInfo(this.opts.orthanc, stored.id));
        const { md5 } = await sent();
        if (got.md5 !== md5 || got.size !== entry.size) {
          await this.quarantine(job, "integrity", `integrity check failed: Orthanc stored ${got.size} bytes with MD5 ${got.md5}, the gateway received ${entry.size} bytes with MD5 ${md5}`);
          return;
        }
      }
      // The pipelined labels did not all land (Orthanc filed a Shared tenant's instance under other IDs...): at Orthanc's IDs.
      if (!up.labeled) await labeler.apply(storedIds(stored), tenant);
      await spool.remove(entry);
      this.opts.registry?.releaseHold(entry.id);
      if (this.linkBound) this.concurrency.done(entry.size, performance.now() - started);
      this.outageOver();
      const seconds = (performance.now() - started) / 1000;
      this.opts.events?.forwarded?.(tenant, entry, seconds, stored);
      for (const w of this.watchers) w.forwarded?.(tenant, entry, seconds, stored);
    } catch (e) {
      await this.failure(job, e);
    }
  }

  private async quarantine(job: Job, kind: QuarantineKind, reason: string): Promise<void> {
    await job.spool.quarantine(job.entry, reason);
    this.opts.registry?.releaseHold(job.entry.id);
    this.opts.events?.quarantined?.(job.tenant, job.entry, reason, kind);
    for (const w of this.watchers) w.quarantined?.(job.tenant, job.entry, reason, kind);
  }

  /** An upload failed: quarantine (for good), pause (Orthanc away), or back off and retry. */
  private async failure(job: Job, e: unknown): Promise<void> {
    const { tenant, entry } = job;
    const err = e instanceof Error ? e : new Error(String(e));
    if (isPermanentRejection(err) || err instanceof DatasetRefusal) {
      this.outageOver();
      const unreadable = err instanceof DatasetRefusal;
      try {
        await this.quarantine(job, unreadable ? "unreadable" : "orthanc-refused", `${unreadable ? "cannot place the instance" : "Orthanc refused the instance"}: ${err.message}`);
        return;
      } catch (qe) {
        // Could not move it aside: keep it queued rather than lose it.
        this.requeue(job, qe instanceof Error ? qe : new Error(String(qe)));
        return;
      }
    }
    if (err instanceof OrthancError && (err.kind === "unreachable" || err.kind === "timeout" || err.kind === "tls")) {
      this.concurrency.failed();
      this.pauseAttempt++;
      this.probing = false;
      this.pausedUntil = Date.now() + backoffDelay(this.pauseAttempt, this.baseMs, this.maxMs);
      job.attempt--; // an outage is not this instance's fault
      this.ready.unshift(job);
      this.opts.events?.failed?.(tenant, entry, err, job.attempt + 1, this.pausedUntil - Date.now());
      this.wakeOne();
      return;
    }
    if (err instanceof OrthancError && err.status !== undefined && err.status >= 500) this.concurrency.failed();
    this.outageOver();
    this.requeue(job, err);
  }

  /** What identifies a spooled instance: from its record, or (records of 0.2 and older) read from its data set. */
  private async identityOf(entry: SpoolEntry): Promise<InstanceIdentity> {
    if (hasIdentity(entry)) {
      return { patientId: entry.patientId!, studyInstanceUid: entry.studyInstanceUid!, seriesInstanceUid: entry.seriesInstanceUid!, sopInstanceUid: entry.sopInstanceUid };
    }
    return readSpooledIdentity(entry, entry.transferSyntaxUid, this.opts.defaultEncoding);
  }

  private requeue(job: Job, err: Error): void {
    const delay = backoffDelay(job.attempt, this.baseMs, this.maxMs);
    job.notBefore = Date.now() + delay;
    this.delayed.push(job);
    this.opts.events?.failed?.(job.tenant, job.entry, err, job.attempt, delay);
    this.wakeOne();
  }

  private outageOver(): void {
    this.probing = false;
    if (this.pauseAttempt === 0) return;
    this.pauseAttempt = 0;
    this.pausedUntil = 0;
    this.wakeAll();
  }
}
