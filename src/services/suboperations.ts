/**
 * What the C-GET and C-MOVE handlers (get.ts, move.ts) share around their C-STORE sub-operations:
 * the context they run in, the resolution of the request (identifier, label-scoped instances, audit),
 * the answer to a request that ends before any sub-operation, one run of sub-operations (the instances
 * fetched from Orthanc, metrics, C-CANCEL), and the sub-operation counts with their Pending and final
 * responses (PS3.4 C.4.2.3.1, C.4.3.3.1). How an instance is sent (back on the requester's association,
 * or to the move destination) stays with each handler.
 */
import type { DicomModality, DicomSettings, MoveSettings, TenantConfig } from "../config/types.ts";
import { EXPLICIT_BIG, EXPLICIT_LITTLE, ElementWriter, IMPLICIT_LITTLE } from "../dicom/element-codec.ts";
import type { Logger } from "../shared/log.ts";
import type { OutOfScope } from "./scope-watch.ts";
import type { OrthancApi } from "../orthanc/nodes.ts";
import { resolveInstances, tenantLabelScope, type LabelScope, type ResolvedInstance, type RetrieveKeys } from "./resolve.ts";
import type { DimseRequest, DimseResponder } from "../net/association.ts";
import type { CommandSet } from "../net/command.ts";
import { Status, TransferSyntax } from "../net/constants.ts";
import { auditKeys, readRetrieveKeys, RetrieveRefusal } from "./retrieve-identifier.ts";
import { InstanceFetcher, type FetchedInstance } from "./retrieve-stream.ts";
import type { RetrieveMetrics, RetrieveRecorder, RetrieveService } from "./retrieve-metrics.ts";

export const DEFAULT_MOVE_SETTINGS: MoveSettings = { connectTimeoutMs: 5000, parallelism: 2, pendingIntervalMs: 1000, pendingEvery: 10 };

export interface RetrieveContext {
  tenant: TenantConfig;
  config: {
    modalities: readonly DicomModality[];
    dicom: Pick<DicomSettings, "strictAetComparison" | "maximumPduLength"> & Partial<Pick<DicomSettings, "defaultEncoding">>;
    move?: MoveSettings;
  };
  orthanc: OrthancApi;
  metrics?: RetrieveMetrics;
  log?: Logger;
  /** Told of resources Orthanc answered outside the tenant's label filter (scope-watch.ts). */
  outOfScope?: OutOfScope;
}

/** Reads the request's identifier and resolves its instances in the tenant's scope, for the audit trail too. Throws RetrieveRefusal. */
export async function resolveRequest(
  ctx: Pick<RetrieveContext, "orthanc" | "tenant" | "config" | "outOfScope">,
  request: DimseRequest,
  responder: DimseResponder,
): Promise<{ keys: RetrieveKeys; scope: LabelScope; instances: ResolvedInstance[] }> {
  const keys = await readRetrieveKeys(request, ctx.config.dicom.defaultEncoding);
  responder.audit(auditKeys(keys));
  const scope = tenantLabelScope(ctx.tenant);
  let instances: ResolvedInstance[];
  try {
    instances = await resolveInstances(ctx.orthanc, scope, keys, { signal: request.signal, outOfScope: ctx.outOfScope });
  } catch (e) {
    if (request.signal.aborted) throw e;
    // Orthanc failures become 0xA701 (PS3.4 C.4.2.1.5).
    throw new RetrieveRefusal(RetrieveStatus.UnableToCalculateMatches, `cannot find the instances in Orthanc: ${e instanceof Error ? e.message : String(e)}`);
  }
  responder.audit({ instances: instances.length });
  return { keys, scope, instances };
}

/**
 * Answers a request that ended before its sub-operations: refused (RetrieveRefusal: its status and
 * comment), or cancelled while its instances were being resolved (Cancel, no sub-operation). Returns
 * false, having sent nothing, for any other error.
 */
export async function answerEndedEarly(
  e: unknown,
  service: RetrieveService,
  request: DimseRequest,
  responder: DimseResponder,
  log: Logger,
  fields: Record<string, unknown>,
): Promise<boolean> {
  if (e instanceof RetrieveRefusal) {
    log.warn(`${service} refused`, { ...fields, status: e.status, reason: e.message });
    await responder.respond({ status: e.status, errorComment: e.message.slice(0, 64) });
    return true;
  }
  if (request.signal.aborted) {
    await responder.respond({ status: Status.Cancel, numberOfCompletedSuboperations: 0, numberOfFailedSuboperations: 0, numberOfWarningSuboperations: 0 });
    return true;
  }
  return false;
}

/** "C-STORE status 0xA700: comment": why a sub-operation did not succeed, for the final ErrorComment. */
export function storeStatusText(status: number | undefined, errorComment?: string): string {
  return `C-STORE status 0x${(status ?? 0).toString(16).padStart(4, "0")}${errorComment ? `: ${errorComment}` : ""}`;
}

export interface SubOperationRunOptions {
  ctx: RetrieveContext;
  service: RetrieveService;
  request: DimseRequest;
  responder: DimseResponder;
  instances: readonly ResolvedInstance[];
  scope: LabelScope;
  settings: MoveSettings;
  /** Pending responses also on a timer, not only between sub-operations (see PendingReporter). */
  pendingTimer: boolean;
  /** Start fetching from Orthanc at once, before the first next(). */
  prime: boolean;
  recorder: RetrieveRecorder;
  log: Logger;
  /** Added to the log line of a cancelled run, after the tenant. */
  logFields?: Record<string, unknown>;
}

/**
 * One run of C-STORE sub-operations: the instances streamed from Orthanc in order (next()), each
 * outcome counted, measured and followed by a Pending response when one is due, and the final
 * response (finish()). Not tied to request.signal: a C-CANCEL lets the instance being sent finish.
 *
 *   const run = await SubOperationRun.begin(opts);   // undefined: no instances, already answered
 *   if (!run) return;
 *   try { for (let item = await run.next(); item; item = await run.next()) ... run.sent() / run.failed() } finally { await run.stop(); }
 *   await run.finish();
 */
export class SubOperationRun {
  readonly counts: SubOperations;
  /** Why the last sub-operation that did not succeed failed: the final response's ErrorComment. */
  lastError: string | undefined;
  /** Set by next() when a C-CANCEL ended the run. */
  cancelled = false;
  private readonly pending: PendingReporter;
  private readonly fetcher: InstanceFetcher;

  private constructor(
    private readonly opts: SubOperationRunOptions,
    counts: SubOperations,
  ) {
    this.counts = counts;
    const { settings, responder } = opts;
    this.pending = new PendingReporter(counts, { every: settings.pendingEvery, intervalMs: settings.pendingIntervalMs }, (f) => responder.respond(f), opts.pendingTimer);
    this.fetcher = new InstanceFetcher(opts.ctx.orthanc, opts.scope, opts.instances, settings.parallelism);
    if (opts.prime) this.fetcher.prime();
  }

  /** Starts the run; with no instances, sends the final response and returns undefined. */
  static async begin(opts: SubOperationRunOptions): Promise<SubOperationRun | undefined> {
    const counts = new SubOperations(opts.instances.length);
    if (opts.instances.length === 0) {
      await opts.responder.respond(counts.finalResponse(false, opts.request.presentationContext.transferSyntax).fields);
      return undefined;
    }
    return new SubOperationRun(opts, counts);
  }

  /**
   * The next instance fetched from Orthanc, in order; undefined after the last one or once a C-CANCEL
   * came. An instance Orthanc could not deliver is a failed sub-operation, recorded here.
   */
  async next(): Promise<{ instance: ResolvedInstance; fetched: FetchedInstance } | undefined> {
    const { request, recorder, log, service, ctx } = this.opts;
    for (;;) {
      if (request.signal.aborted) {
        this.cancelled = true;
        return undefined;
      }
      const item = await this.fetcher.next();
      if (!item) return undefined;
      const { instance } = item;
      if (item.error || !item.fetched) {
        recorder.subOperationStarted();
        const error = item.error?.message;
        log.warn(`${service} sub-operation failed: instance not available`, { tenant: ctx.tenant.aet, sopInstanceUid: instance.sopInstanceUid, error });
        await this.failed(instance, error);
        continue;
      }
      return { instance, fetched: item.fetched };
    }
  }

  /** The instance fetched again, after its stream from Orthanc broke while it was being sent (move.ts). */
  refetch(instance: ResolvedInstance, error: Error): Promise<FetchedInstance> {
    return this.fetcher.refetch(instance, error);
  }

  /** A sub-operation that failed before anything was sent. */
  async failed(instance: ResolvedInstance, error: string | undefined): Promise<void> {
    this.lastError = error;
    this.counts.record("failed", instance.sopInstanceUid);
    this.opts.recorder.subOperation("failed", 0);
    await this.pending.afterSubOperation();
  }

  /** A failed sub-operation after which nothing more can be sent: every remaining one fails at once. */
  failRemaining(instance: ResolvedInstance, error: string | undefined): void {
    this.lastError = error;
    const before = this.counts.failed;
    this.counts.record("failed", instance.sopInstanceUid);
    this.counts.failRemaining(this.opts.instances);
    for (let k = before; k < this.counts.failed; k++) this.opts.recorder.subOperation("failed", 0);
  }

  /** A C-STORE sub-operation that was sent: its status (undefined without an answer) and the data set bytes sent. */
  async sent(instance: ResolvedInstance, status: number | undefined, bytes: number): Promise<void> {
    const result = classifyStoreStatus(status);
    this.counts.record(result, instance.sopInstanceUid);
    this.opts.recorder.subOperation(result, bytes);
    await this.pending.afterSubOperation();
  }

  /** After the last sub-operation: no more fetching, and no Pending response after this. */
  async stop(): Promise<void> {
    this.fetcher.close();
    await this.pending.stop();
  }

  /** The final response, with the counts for the audit trail. */
  async finish(): Promise<void> {
    const { ctx, service, request, responder, log } = this.opts;
    const counts = this.counts;
    if (this.cancelled) log.info(`${service} cancelled`, { tenant: ctx.tenant.aet, ...this.opts.logFields, completed: counts.completed, remaining: counts.remaining });
    responder.audit(auditCounts(counts, this.cancelled));
    const final = counts.finalResponse(this.cancelled, request.presentationContext.transferSyntax, this.lastError);
    await responder.respond(final.fields, final.dataset);
  }
}

// ---- sub-operation counts, Pending and final responses -----------------------------------------

/** Status codes of C-MOVE/C-GET responses not in constants.ts, PS3.4 C.4.2.1.5 and C.4.3.1.4. */
export const RetrieveStatus = {
  UnableToCalculateMatches: 0xa701,
  UnableToPerformSubOperations: 0xa702,
  SubOperationsWithFailures: 0xb000,
} as const;

/** The sub-operation counts of a finished retrieve, for the audit trail. */
export function auditCounts(counts: SubOperations, cancelled: boolean): Record<string, unknown> {
  return {
    completed: counts.completed,
    failed: counts.failed,
    warning: counts.warning,
    ...(cancelled ? { cancelled: true, remaining: counts.remaining } : {}),
    ...(counts.failedUids.length > 0 ? { failedSopInstanceUids: counts.failedUids.slice(0, 100).join("\\") } : {}),
  };
}

/**
 * Identifier of a final response with failures: Failed SOP Instance UID List (0008,0058), PS3.4
 * C.4.2.1.4.2. In explicit VR the UI length is 16 bits: the list is cut to what fits.
 */
export function encodeFailedSopInstanceUidList(uids: readonly string[], transferSyntax: string): Uint8Array {
  const encoding = transferSyntax === TransferSyntax.ImplicitVRLittleEndian ? IMPLICIT_LITTLE : transferSyntax === TransferSyntax.ExplicitVRBigEndian ? EXPLICIT_BIG : EXPLICIT_LITTLE;
  let text = "";
  for (const u of uids) {
    const next = text === "" ? u : `${text}\\${u}`;
    if (encoding.explicitVr && next.length > 0xfffe) break;
    text = next;
  }
  if (text.length % 2) text += "\0";
  const value = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) value[i] = text.charCodeAt(i) & 0x7f;
  const w = new ElementWriter(encoding, value.length + 8);
  w.element(0x00080058, "UI", value);
  return w.bytes();
}

export type SubOperationResult = "completed" | "failed" | "warning";

/** Warning statuses of C-STORE (PS3.7 C.3, PS3.4 B.2.3): 0001, Bxxx, 0107, 0116. */
export function classifyStoreStatus(status: number | undefined): SubOperationResult {
  if (status === Status.Success) return "completed";
  if (status === undefined) return "failed";
  if (status === 0x0001 || (status & 0xf000) === 0xb000 || status === 0x0107 || status === 0x0116) return "warning";
  return "failed";
}

export class SubOperations {
  completed = 0;
  failed = 0;
  warning = 0;
  readonly failedUids: string[] = [];
  constructor(readonly total: number) {}

  get remaining(): number {
    return Math.max(0, this.total - this.completed - this.failed - this.warning);
  }

  get done(): number {
    return this.completed + this.failed + this.warning;
  }

  record(result: SubOperationResult, sopInstanceUid: string): void {
    this[result]++;
    if (result === "failed") this.failedUids.push(sopInstanceUid);
  }

  /** Counts every sub-operation not yet performed as failed (e.g. the destination cannot be reached). */
  failRemaining(instances: readonly { sopInstanceUid: string }[]): void {
    for (const i of instances.slice(this.done)) this.record("failed", i.sopInstanceUid);
  }

  /** Counts for a Pending response (with Remaining). */
  pendingFields(): CommandSet {
    return {
      status: Status.Pending,
      numberOfRemainingSuboperations: clamp(this.remaining),
      numberOfCompletedSuboperations: clamp(this.completed),
      numberOfFailedSuboperations: clamp(this.failed),
      numberOfWarningSuboperations: clamp(this.warning),
    };
  }

  /**
   * The final response (PS3.4 C.4.2.3.1): Success when nothing failed or warned; Cancel (with the
   * sub-operations not initiated as Remaining); Failure 0xA702 when every sub-operation failed; else
   * Warning 0xB000. The identifier carries the Failed SOP Instance UID List when any failed.
   */
  finalResponse(cancelled: boolean, transferSyntax: string, errorComment?: string): { fields: CommandSet; dataset?: Uint8Array } {
    let status: number;
    if (cancelled) status = Status.Cancel;
    else if (this.failed === 0 && this.warning === 0) status = Status.Success;
    else if (this.completed === 0 && this.warning === 0) status = RetrieveStatus.UnableToPerformSubOperations;
    else status = RetrieveStatus.SubOperationsWithFailures;
    const fields: CommandSet = {
      status,
      numberOfCompletedSuboperations: clamp(this.completed),
      numberOfFailedSuboperations: clamp(this.failed),
      numberOfWarningSuboperations: clamp(this.warning),
    };
    if (cancelled) fields.numberOfRemainingSuboperations = clamp(this.remaining);
    if (errorComment && status !== Status.Success) fields.errorComment = errorComment.slice(0, 64);
    const dataset = this.failedUids.length > 0 ? encodeFailedSopInstanceUidList(this.failedUids, transferSyntax) : undefined;
    return { fields, dataset };
  }
}

function clamp(n: number): number {
  return Math.min(0xffff, Math.max(0, n));
}

export interface PendingSettings {
  /** Send a Pending response after this many sub-operations... */
  every: number;
  /** ...or when this much time passed since the last response. */
  intervalMs: number;
}

/**
 * Sends Pending responses at least every `every` sub-operations and every `intervalMs`. With
 * `timer`, a slow sub-operation does not delay them (C-MOVE: responses travel on another association
 * than the sub-operations); without it (C-GET) they are sent between sub-operations only.
 */
export class PendingReporter {
  private lastAt = performance.now();
  private lastDone = 0;
  private interval: ReturnType<typeof setInterval> | undefined;
  private sending: Promise<void> = Promise.resolve();
  private stopped = false;

  constructor(
    private readonly counts: SubOperations,
    private readonly settings: PendingSettings,
    private readonly send: (fields: CommandSet) => Promise<void>,
    timer: boolean,
  ) {
    if (timer && settings.intervalMs > 0) {
      this.interval = setInterval(() => {
        if (performance.now() - this.lastAt >= settings.intervalMs) void this.emit();
      }, Math.max(50, Math.min(settings.intervalMs, 1000)));
      (this.interval as { unref?: () => void }).unref?.();
    }
  }

  /** After each sub-operation. */
  async afterSubOperation(): Promise<void> {
    if (this.counts.remaining === 0) return; // the final response follows at once
    const byCount = this.settings.every > 0 && this.counts.done - this.lastDone >= this.settings.every;
    const byTime = this.settings.intervalMs > 0 && performance.now() - this.lastAt >= this.settings.intervalMs;
    if (byCount || byTime) await this.emit();
  }

  private emit(): Promise<void> {
    if (this.stopped) return this.sending;
    this.lastAt = performance.now();
    this.lastDone = this.counts.done;
    const fields = this.counts.pendingFields();
    this.sending = this.sending.then(() => (this.stopped ? undefined : this.send(fields))).catch(() => {});
    return this.sending;
  }

  /** Stops the timer and waits for a Pending response being sent (so that the final one comes last). */
  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.interval);
    await this.sending;
  }
}
