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
import { encodeCommandSet, type CommandSet } from "../net/command.ts";
import { Status, TransferSyntax } from "../net/constants.ts";
import { responseTo } from "../net/dimse.ts";
import { singlePduDatasetRoom } from "../net/pdata-writer.ts";
import { OrthancError } from "../orthanc/client.ts";
import { errorComment, failure, type Failure } from "./error-comment.ts";
import { auditKeys, readRetrieveKeys, RetrieveRefusal } from "./retrieve-identifier.ts";
import { InstanceFetcher, SubOperationError, type FetchedInstance, type SendPlan, type SendPlanner } from "./retrieve-stream.ts";
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
    // Orthanc failures become 0xA701 (PS3.4 C.4.2.1.5); the whole message goes to the log.
    const why = e instanceof OrthancError ? (e.kind === "unreachable" ? "Orthanc is unreachable" : e.kind === "timeout" ? "Orthanc did not answer in time" : `Orthanc failed (${e.status ?? e.kind})`) : "Orthanc's answer is unusable";
    throw new RetrieveRefusal(RetrieveStatus.UnableToCalculateMatches, `${why}: cannot find the instances`, `cannot find the instances in Orthanc: ${e instanceof Error ? e.message : String(e)}`);
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
    log.warn(`${service} refused`, { ...fields, status: e.status, reason: e.detail ?? e.message });
    await responder.respond({ status: e.status, errorComment: errorComment(e.message) });
    return true;
  }
  if (request.signal.aborted) {
    await responder.respond({ status: Status.Cancel, numberOfCompletedSuboperations: 0, numberOfFailedSuboperations: 0, numberOfWarningSuboperations: 0 });
    return true;
  }
  return false;
}

/** Why a C-STORE sub-operation `peer` answered did not succeed: "DEST answered 0xA700: its comment". */
export function storeStatusFailure(peer: string, status: number | undefined, comment?: string): Failure {
  const text = `${peer} answered 0x${(status ?? 0).toString(16).toUpperCase().padStart(4, "0")}${comment ? `: ${comment}` : ""}`;
  return failure(text, `${text} to a C-STORE sub-operation`);
}

/** A sub-operation that failed on an error (from Orthanc, the fetch, or the plan): comment and detail. */
export function failureOf(e: unknown, what: string): Failure {
  if (e instanceof SubOperationError) return e.failure;
  const detail = `${what}: ${e instanceof Error ? e.message : String(e)}`;
  if (e instanceof OrthancError) {
    const short = e.kind === "unreachable" ? "Orthanc became unreachable" : e.kind === "timeout" ? "Orthanc did not send an instance in time" : `Orthanc answered ${e.status ?? e.kind} for an instance`;
    return failure(short, detail);
  }
  return failure(e instanceof Error ? e.message : String(e), detail);
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
  /** How each instance is sent (default: as stored). */
  plan?: SendPlanner;
  /**
   * Nothing more can be sent when this answers a failure (e.g. the destination is unreachable): the
   * sub-operation being prepared and every remaining one fail at once with it, without a log line each.
   */
  stopWhen?: () => Failure | undefined;
  /**
   * The final response and its Failed SOP Instance UID List must fit one P-DATA-TF PDU (C-GET: dcmtk's
   * getscu 3.6.7 never reads a data set after a C-GET response; in the same PDU as the response it is
   * never met). The list is then cut to what fits; the counts stay exact.
   */
  finalInOnePdu?: boolean;
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
  /** Why the last sub-operation that did not succeed failed: its comment is the final response's ErrorComment. */
  lastFailure: Failure | undefined;
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
    this.fetcher = new InstanceFetcher(opts.ctx.orthanc, opts.scope, opts.instances, settings.parallelism, undefined, opts.plan);
    if (opts.prime) this.fetcher.prime();
  }

  /** Where the run's metrics go. */
  get recorder(): RetrieveRecorder {
    return this.opts.recorder;
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
  async next(): Promise<{ instance: ResolvedInstance; plan?: SendPlan; fetched: FetchedInstance } | undefined> {
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
        const stop = this.stopped();
        if (stop) {
          this.failRemaining(instance, stop);
          return undefined;
        }
        const f = failureOf(item.error, `instance ${instance.sopInstanceUid} not available`);
        log.warn(`${service} sub-operation failed: instance not sent`, { tenant: ctx.tenant.aet, sopInstanceUid: instance.sopInstanceUid, transferSyntax: instance.transferSyntax, error: f.detail });
        await this.failed(instance, f, item.plan);
        continue;
      }
      return { instance, plan: item.plan, fetched: item.fetched };
    }
  }

  /** Why nothing more can be sent, if so (SubOperationRunOptions.stopWhen). */
  stopped(): Failure | undefined {
    return this.opts.stopWhen?.();
  }

  /**
   * The instance fetched again, after its stream from Orthanc broke while it was being sent (move.ts): as
   * `broken` was fetched (the same transcoding), from the next node of a cluster.
   */
  refetch(broken: FetchedInstance, error: Error): Promise<FetchedInstance> {
    return this.fetcher.refetch(broken, error);
  }

  /** A sub-operation that failed before anything was sent (`plan`: what was planned, for the transcoding count). */
  async failed(instance: ResolvedInstance, why: Failure, plan?: SendPlan): Promise<void> {
    this.lastFailure = why;
    this.counts.record("failed", instance.sopInstanceUid);
    this.opts.recorder.subOperation("failed", 0, plan?.as === "transcoded");
    await this.pending.afterSubOperation();
  }

  /** A failed sub-operation after which nothing more can be sent: every remaining one fails at once. */
  failRemaining(instance: ResolvedInstance, why: Failure): void {
    this.lastFailure = why;
    const before = this.counts.failed;
    this.counts.record("failed", instance.sopInstanceUid);
    this.counts.failRemaining(this.opts.instances);
    for (let k = before; k < this.counts.failed; k++) this.opts.recorder.subOperation("failed", 0);
  }

  /**
   * A C-STORE sub-operation that was sent: its status (undefined without an answer), the data set bytes
   * sent, whether Orthanc transcoded it, and why it did not succeed when it did not.
   */
  async sent(instance: ResolvedInstance, status: number | undefined, bytes: number, transcoded: boolean, why?: Failure): Promise<void> {
    const result = classifyStoreStatus(status);
    if (result !== "completed" && why) this.lastFailure = why;
    this.counts.record(result, instance.sopInstanceUid);
    this.opts.recorder.subOperation(result, bytes, transcoded);
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
    const peerMax = responder.association.peerMaxPduLength;
    const identifierRoom = this.opts.finalInOnePdu ? (fields: CommandSet) => singlePduDatasetRoom(peerMax, encodeCommandSet(responseTo(request, fields, true)).length) : undefined;
    const final = counts.finalResponse(this.cancelled, request.presentationContext.transferSyntax, this.lastFailure?.comment, identifierRoom);
    if (final.listCut) log.warn(`${service} Failed SOP Instance UID List cut to fit one PDU`, { tenant: ctx.tenant.aet, failed: counts.failed, listed: final.listCut });
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
 * C.4.2.1.4.2 and C.4.3.1.3.2. In explicit VR the UI length is 16 bits, and `maxBytes` may bound the
 * identifier: the list is cut to what fits.
 */
export function encodeFailedSopInstanceUidList(uids: readonly string[], transferSyntax: string, maxBytes = Infinity): Uint8Array {
  const encoding = transferSyntax === TransferSyntax.ImplicitVRLittleEndian ? IMPLICIT_LITTLE : transferSyntax === TransferSyntax.ExplicitVRBigEndian ? EXPLICIT_BIG : EXPLICIT_LITTLE;
  // Element header: 8 bytes (implicit, and explicit UI); the value padded to an even length.
  const maxValue = Math.min(encoding.explicitVr ? 0xfffe : Infinity, maxBytes - 8 - 1);
  let text = "";
  for (const u of uids) {
    const next = text === "" ? u : `${text}\\${u}`;
    if (next.length > maxValue) break;
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
  finalResponse(
    cancelled: boolean,
    transferSyntax: string,
    errorComment?: string,
    identifierRoom?: (fields: CommandSet) => number,
  ): { fields: CommandSet; dataset?: Uint8Array; listCut?: number } {
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
    if (errorComment && status !== Status.Success) fields.errorComment = errorComment;
    if (this.failedUids.length === 0) return { fields };
    const dataset = encodeFailedSopInstanceUidList(this.failedUids, transferSyntax, identifierRoom?.(fields));
    const listed = dataset.length > 8 ? (latin1.decode(dataset.subarray(8)).replace(/\0$/, "").match(/\\/g)?.length ?? 0) + 1 : 0;
    return { fields, dataset, ...(listed < this.failedUids.length ? { listCut: listed } : {}) };
  }
}

const latin1 = new TextDecoder("latin1");

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
