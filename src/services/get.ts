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
import { silentLogger } from "../shared/log.ts";
import type { AssociationInfo, DimseHandler, DimseRequest, DimseResponder, PresentationContext } from "../net/association.ts";
import { CommandField, Status } from "../net/constants.ts";
import { RetrieveRecorder } from "./retrieve-metrics.ts";
import { pinned } from "../orthanc/nodes.ts";
import { answerEndedEarly, DEFAULT_MOVE_SETTINGS, resolveRequest, storeStatusText, SubOperationRun, type RetrieveContext } from "./suboperations.ts";

/** The accepted storage context for a SOP class and transfer syntax on which the requester took the SCP role. */
export function storageContextFor(association: AssociationInfo, sopClassUid: string, transferSyntax: string): PresentationContext | undefined {
  if (!association.roleSelections.some((r) => r.sopClassUid === sopClassUid && r.scp)) return undefined;
  for (const pc of association.presentationContexts.values()) {
    if (pc.abstractSyntax === sopClassUid && pc.transferSyntax === transferSyntax) return pc;
  }
  return undefined;
}

export function createGetHandler(shared: RetrieveContext): DimseHandler {
  const log = shared.log ?? silentLogger;
  return async (request: DimseRequest, responder: DimseResponder) => {
    // One Orthanc node for the listing and the fetches (another one if it fails: nodes.ts).
    const ctx: RetrieveContext = { ...shared, orthanc: pinned(shared.orthanc) };
    const settings = ctx.config.move ?? DEFAULT_MOVE_SETTINGS;
    const tenant = ctx.tenant.aet;
    const recorder = new RetrieveRecorder(ctx.metrics, tenant, "C-GET", "requester");
    const fields = { tenant, callingAe: responder.association.callingAeTitle };
    try {
      let resolved: Awaited<ReturnType<typeof resolveRequest>>;
      try {
        resolved = await resolveRequest(ctx, request, responder);
        log.info("C-GET", { ...fields, level: resolved.keys.level, instances: resolved.instances.length });
      } catch (e) {
        if (await answerEndedEarly(e, "C-GET", request, responder, log, fields)) return;
        throw e;
      }
      const run = await SubOperationRun.begin({ ctx, service: "C-GET", request, responder, instances: resolved.instances, scope: resolved.scope, settings, pendingTimer: false, prime: false, recorder, log });
      if (run) await performGet(run, request, responder, recorder);
    } finally {
      recorder.finished();
    }
  };
}

async function performGet(run: SubOperationRun, request: DimseRequest, responder: DimseResponder, recorder: RetrieveRecorder): Promise<void> {
  const priority = request.command.priority ?? 0;
  try {
    for (;;) {
      const item = await run.next();
      if (!item) break;
      const { instance, fetched } = item;
      recorder.subOperationStarted();
      const sopClass = fetched.meta.sopClassUid || instance.sopClassUid;
      const pc = storageContextFor(responder.association, sopClass, fetched.meta.transferSyntaxUid);
      if (!pc) {
        fetched.discard();
        await run.failed(instance, `no storage context with SCP role for ${sopClass} in ${fetched.meta.transferSyntaxUid}`);
        continue;
      }
      // A failure here (the requester went away, or Orthanc's body broke in the middle of the message)
      // leaves the association unusable: it propagates, and the association is aborted.
      const rsp = await responder.subOperation(
        pc.id,
        { commandField: CommandField.CStoreRQ, affectedSopClassUid: sopClass, affectedSopInstanceUid: instance.sopInstanceUid, priority },
        fetched.dataset,
      );
      if (rsp.status !== Status.Success) run.lastError = storeStatusText(rsp.status, rsp.errorComment);
      await run.sent(instance, rsp.status, fetched.bytes);
    }
  } finally {
    await run.stop();
  }
  await run.finish();
}
