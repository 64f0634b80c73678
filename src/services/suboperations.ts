/**
 * What the C-GET and C-MOVE handlers (get.ts, move.ts) share around their C-STORE sub-operations:
 * the context they run in, the resolution of the request (identifier, label-scoped instances, audit),
 * the answer to a request that ends before any sub-operation, and one run of sub-operations (counts,
 * Pending responses, metrics, the instances fetched from Orthanc, C-CANCEL, the final response).
 * How an instance is sent (back on the requester's association, or to the move destination) stays
 * with each handler.
 */
import type { DicomModality, DicomSettings, MoveSettings, TenantConfig } from "../config/types.ts";
import type { Logger } from "../shared/log.ts";
import type { OrthancClient } from "../orthanc/client.ts";
import type { LabelScope, ResolvedInstance, RetrieveKeys } from "./resolve.ts";
import type { DimseRequest, DimseResponder } from "../net/association.ts";
import { Status } from "../net/constants.ts";
import {
  auditCounts,
  auditKeys,
  classifyStoreStatus,
  InstanceFetcher,
  PendingReporter,
  readRetrieveKeys,
  resolveForTenant,
  RetrieveRefusal,
  SubOperations,
  type FetchedInstance,
} from "./retrieve.ts";
import type { RetrieveMetrics, RetrieveRecorder, RetrieveService } from "./retrieve-metrics.ts";

export const DEFAULT_MOVE_SETTINGS: MoveSettings = { connectTimeoutMs: 5000, parallelism: 2, pendingIntervalMs: 1000, pendingEvery: 10 };

export interface RetrieveContext {
  tenant: TenantConfig;
  config: {
    modalities: readonly DicomModality[];
    dicom: Pick<DicomSettings, "strictAetComparison" | "maximumPduLength">;
    move?: MoveSettings;
  };
  orthanc: OrthancClient;
  metrics?: RetrieveMetrics;
  log?: Logger;
}

/** Reads the request's identifier and resolves its instances in the tenant's scope, for the audit trail too. Throws RetrieveRefusal. */
export async function resolveRequest(
  ctx: Pick<RetrieveContext, "orthanc" | "tenant">,
  request: DimseRequest,
  responder: DimseResponder,
): Promise<{ keys: RetrieveKeys; scope: LabelScope; instances: ResolvedInstance[] }> {
  const keys = await readRetrieveKeys(request);
  responder.audit(auditKeys(keys));
  const { scope, instances } = await resolveForTenant(ctx.orthanc, ctx.tenant, keys, request.signal);
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
