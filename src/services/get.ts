/**
 * C-GET SCP (PS3.4 C.4.3), Patient Root and Study Root: the instances of the request, resolved in the
 * tenant's label scope, go back to the requester in C-STORE sub-operations on the same association,
 * each streamed from Orthanc's GET /instances/{id}/file.
 *
 * The requester must have proposed a storage presentation context for the instance's SOP class, with
 * the SCP role selected for that SOP class (PS3.7 D.3.3.4), which the tenant's negotiation accepts for
 * storage SOP classes. An instance goes in its stored transfer syntax when such a context has it, else
 * transcoded by Orthanc to Explicit or Implicit VR Little Endian when the requester accepted one of
 * those (transcode.ts); without either it is a failed sub-operation (PS3.4 C.4.3.3.1). Pending responses
 * are sent between sub-operations (every Gateway.Move.PendingEvery sub-operations or
 * PendingIntervalSeconds); C-CANCEL stops after the current sub-operation with 0xFE00.
 *
 * The final response and its Failed SOP Instance UID List (PS3.4 C.4.3.1.3.2) travel in one P-DATA-TF
 * PDU: dcmtk's getscu (DcmSCU, up to 3.6.7 at least) reads the command of a C-GET response and never
 * its data set, so a data set in a PDU of its own is what it then meets when it releases ("DUL P-Data
 * PDU arrived") and it aborts. Orthanc avoids it by putting the list in the command set instead (a
 * non-group-0000 element there, which PS3.7 6.3.1 does not allow, with no data set).
 */
import { silentLogger } from "../shared/log.ts";
import type { AssociationInfo, DimseHandler, DimseRequest, DimseResponder, PresentationContext } from "../net/association.ts";
import { CommandField, Status } from "../net/constants.ts";
import { failure, withUid } from "./error-comment.ts";
import type { ResolvedInstance } from "./resolve.ts";
import { RetrieveRecorder } from "./retrieve-metrics.ts";
import { pinned } from "../orthanc/nodes.ts";
import type { SendPlan } from "./retrieve-stream.ts";
import { answerEndedEarly, DEFAULT_MOVE_SETTINGS, resolveRequest, storeStatusFailure, SubOperationRun, type RetrieveContext } from "./suboperations.ts";
import { planTransfer } from "./transcode.ts";

/** The accepted storage context for a SOP class and transfer syntax on which the requester took the SCP role. */
export function storageContextFor(association: AssociationInfo, sopClassUid: string, transferSyntax: string): PresentationContext | undefined {
  if (!hasScpRole(association, sopClassUid)) return undefined;
  for (const pc of association.presentationContexts.values()) {
    if (pc.abstractSyntax === sopClassUid && pc.transferSyntax === transferSyntax) return pc;
  }
  return undefined;
}

function hasScpRole(association: AssociationInfo, sopClassUid: string): boolean {
  return association.roleSelections.some((r) => r.sopClassUid === sopClassUid && r.scp);
}

/** How an instance goes back to the requester: as stored, transcoded, or not (no context for its class). */
async function getPlan(ctx: RetrieveContext, association: AssociationInfo, instance: ResolvedInstance): Promise<SendPlan> {
  const contexts = [...association.presentationContexts.values()].filter((pc) => pc.abstractSyntax === instance.sopClassUid);
  if (contexts.length === 0 || !hasScpRole(association, instance.sopClassUid)) {
    return {
      as: "none",
      failure: failure(
        withUid("no SCP role context for ", instance.sopClassUid, "the requester took no SCP role for an instance's SOP class"),
        `the requester accepted no storage presentation context with the SCP role for SOP class ${instance.sopClassUid} (instance ${instance.sopInstanceUid}): propose it with role selection (PS3.7 D.3.3.4)`,
      ),
    };
  }
  return planTransfer(ctx.orthanc, instance, (ts) => contexts.some((pc) => pc.transferSyntax === ts), "the requester");
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
        log.info("C-GET", { ...fields, queryLevel: resolved.keys.level, instances: resolved.instances.length });
      } catch (e) {
        if (await answerEndedEarly(e, "C-GET", request, responder, log, fields)) return;
        throw e;
      }
      const run = await SubOperationRun.begin({
        ctx,
        service: "C-GET",
        request,
        responder,
        instances: resolved.instances,
        scope: resolved.scope,
        settings,
        pendingTimer: false,
        prime: false,
        recorder,
        log,
        plan: (instance) => getPlan(ctx, responder.association, instance),
        finalInOnePdu: true,
      });
      if (run) await performGet(run, request, responder);
    } finally {
      recorder.finished();
    }
  };
}

async function performGet(run: SubOperationRun, request: DimseRequest, responder: DimseResponder): Promise<void> {
  const priority = request.command.priority ?? 0;
  try {
    for (;;) {
      const item = await run.next();
      if (!item) break;
      const { instance, fetched } = item;
      run.recorder.subOperationStarted();
      const sopClass = fetched.meta.sopClassUid || instance.sopClassUid;
      const ts = fetched.meta.transferSyntaxUid;
      const pc = storageContextFor(responder.association, sopClass, ts);
      if (!pc) {
        fetched.discard();
        await run.failed(instance, failure(withUid("no SCP role context for ", ts, "no SCP role context for the instance's syntax"), `no storage context with the SCP role for ${sopClass} in ${ts} (instance ${instance.sopInstanceUid})`), item.plan);
        continue;
      }
      // A failure here (the requester went away, or Orthanc's body broke in the middle of the message)
      // leaves the association unusable: it propagates, and the association is aborted.
      const rsp = await responder.subOperation(
        pc.id,
        { commandField: CommandField.CStoreRQ, affectedSopClassUid: sopClass, affectedSopInstanceUid: instance.sopInstanceUid, priority },
        fetched.dataset,
      );
      const why = rsp.status !== Status.Success ? storeStatusFailure("the requester", rsp.status, rsp.errorComment) : undefined;
      await run.sent(instance, rsp.status, fetched.bytes, fetched.transcodedTo !== undefined, why);
    }
  } finally {
    await run.stop();
  }
  await run.finish();
}
