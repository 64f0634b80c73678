/**
 * C-GET SCP (PS3.4 C.4.3), Patient Root and Study Root: the instances of the request, resolved in the
 * tenant's label scope, go back to the requester in C-STORE sub-operations on the same association,
 * each streamed from Orthanc's GET /instances/{id}/file.
 *
 * The requester must have proposed a storage presentation context for the instance's SOP class and
 * transfer syntax, with the SCP role selected for that SOP class (PS3.7 D.3.3.4), which the tenant's
 * negotiation accepts for storage SOP classes. Nothing is transcoded: an instance without such a
 * context is a failed sub-operation (PS3.4 C.4.3.3.1). Pending responses are sent between
 * sub-operations (every Gateway.Move.PendingEvery sub-operations or PendingIntervalSeconds); C-CANCEL
 * stops after the current sub-operation with 0xFE00.
 */
import { silentLogger, type Logger } from "../log.ts";
import type { LabelScope, ResolvedInstance } from "../orthanc/resolve.ts";
import type { AssociationInfo, DimseHandler, DimseRequest, DimseResponder, PresentationContext } from "./association.ts";
import { CommandField, Status } from "./constants.ts";
import { DEFAULT_MOVE_SETTINGS, type RetrieveContext } from "./move.ts";
import { auditCounts, auditKeys, classifyStoreStatus, InstanceFetcher, PendingReporter, readRetrieveKeys, resolveForTenant, RetrieveRefusal, SubOperations } from "./retrieve.ts";
import { RetrieveRecorder } from "./retrieve-metrics.ts";

/** The accepted storage context for a SOP class and transfer syntax on which the requester took the SCP role. */
export function storageContextFor(association: AssociationInfo, sopClassUid: string, transferSyntax: string): PresentationContext | undefined {
  if (!association.roleSelections.some((r) => r.sopClassUid === sopClassUid && r.scp)) return undefined;
  for (const pc of association.presentationContexts.values()) {
    if (pc.abstractSyntax === sopClassUid && pc.transferSyntax === transferSyntax) return pc;
  }
  return undefined;
}

export function createGetHandler(ctx: RetrieveContext): DimseHandler {
  const log = ctx.log ?? silentLogger;
  return async (request: DimseRequest, responder: DimseResponder) => {
    const settings = ctx.config.move ?? DEFAULT_MOVE_SETTINGS;
    const tenant = ctx.tenant.aet;
    const recorder = new RetrieveRecorder(ctx.metrics, tenant, "C-GET", "requester");
    const fields = { tenant, callingAe: responder.association.callingAeTitle };
    try {
      let instances: ResolvedInstance[];
      let scope: LabelScope;
      try {
        const keys = await readRetrieveKeys(request);
        responder.audit(auditKeys(keys));
        ({ scope, instances } = await resolveForTenant(ctx.orthanc, ctx.tenant, keys, request.signal));
        responder.audit({ instances: instances.length });
        log.info("C-GET", { ...fields, level: keys.level, instances: instances.length });
      } catch (e) {
        if (e instanceof RetrieveRefusal) {
          log.warn("C-GET refused", { ...fields, status: e.status, reason: e.message });
          await responder.respond({ status: e.status, errorComment: e.message.slice(0, 64) });
          return;
        }
        if (request.signal.aborted) {
          await responder.respond({ status: Status.Cancel, numberOfCompletedSuboperations: 0, numberOfFailedSuboperations: 0, numberOfWarningSuboperations: 0 });
          return;
        }
        throw e;
      }
      await performGet(ctx, request, responder, instances, scope, settings.parallelism, { every: settings.pendingEvery, intervalMs: settings.pendingIntervalMs }, recorder, log);
    } finally {
      recorder.finished();
    }
  };
}

async function performGet(
  ctx: RetrieveContext,
  request: DimseRequest,
  responder: DimseResponder,
  instances: ResolvedInstance[],
  scope: LabelScope,
  parallelism: number,
  pendingSettings: { every: number; intervalMs: number },
  recorder: RetrieveRecorder,
  log: Logger,
): Promise<void> {
  const counts = new SubOperations(instances.length);
  const identifierTs = request.presentationContext.transferSyntax;
  if (instances.length === 0) {
    await responder.respond(counts.finalResponse(false, identifierTs).fields);
    return;
  }
  const pending = new PendingReporter(counts, pendingSettings, (f) => responder.respond(f), false);
  // Not tied to request.signal: a C-CANCEL must let the instance being sent finish.
  const fetcher = new InstanceFetcher(ctx.orthanc, scope, instances, parallelism);
  const priority = request.command.priority ?? 0;
  let cancelled = false;
  let lastError: string | undefined;
  try {
    for (;;) {
      if (request.signal.aborted) {
        cancelled = true;
        break;
      }
      const item = await fetcher.next();
      if (!item) break;
      const { instance } = item;
      recorder.subOperationStarted();
      if (item.error || !item.fetched) {
        lastError = item.error?.message;
        log.warn("C-GET sub-operation failed: instance not available", { tenant: ctx.tenant.aet, sopInstanceUid: instance.sopInstanceUid, error: lastError });
        counts.record("failed", instance.sopInstanceUid);
        recorder.subOperation("failed", 0);
        await pending.afterSubOperation();
        continue;
      }
      const fetched = item.fetched;
      const sopClass = fetched.meta.sopClassUid || instance.sopClassUid;
      const pc = storageContextFor(responder.association, sopClass, fetched.meta.transferSyntax);
      if (!pc) {
        fetched.discard();
        lastError = `no storage context with SCP role for ${sopClass} in ${fetched.meta.transferSyntax}`;
        counts.record("failed", instance.sopInstanceUid);
        recorder.subOperation("failed", 0);
        await pending.afterSubOperation();
        continue;
      }
      // A failure here (the requester went away, or Orthanc's body broke in the middle of the message)
      // leaves the association unusable: it propagates, and the association is aborted.
      const rsp = await responder.subOperation(
        pc.id,
        { commandField: CommandField.CStoreRQ, affectedSopClassUid: sopClass, affectedSopInstanceUid: instance.sopInstanceUid, priority },
        fetched.dataset,
      );
      if (rsp.status !== Status.Success) lastError = `C-STORE status 0x${(rsp.status ?? 0).toString(16).padStart(4, "0")}${rsp.errorComment ? `: ${rsp.errorComment}` : ""}`;
      const result = classifyStoreStatus(rsp.status);
      counts.record(result, instance.sopInstanceUid);
      recorder.subOperation(result, fetched.bytes);
      await pending.afterSubOperation();
    }
  } finally {
    fetcher.close();
    await pending.stop();
  }
  if (cancelled) log.info("C-GET cancelled", { tenant: ctx.tenant.aet, completed: counts.completed, remaining: counts.remaining });
  responder.audit(auditCounts(counts, cancelled));
  const final = counts.finalResponse(cancelled, identifierTs, lastError);
  await responder.respond(final.fields, final.dataset);
}
