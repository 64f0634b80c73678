/**
 * C-MOVE SCP (PS3.4 C.4.2), Patient Root and Study Root: the instances of the request, resolved in
 * the tenant's label scope, are sent by the gateway itself to the move destination in C-STORE
 * sub-operations on an association it opens (called AE = the destination's AE title, calling AE =
 * the tenant's AE title), each instance streamed from Orthanc's GET /instances/{id}/file.
 *
 * - The destination must be a DicomModalities entry, and one of the tenant's AllowedDestinations
 *   when that list is set; otherwise 0xA801 at once.
 * - Presentation contexts: for each (SOP class, stored transfer syntax) of the instances, one context
 *   proposing the stored syntax alone and one proposing the uncompressed syntaxes (Explicit, Implicit VR
 *   Little Endian; the one of them that is stored left out). An instance goes as stored when the
 *   destination accepts that, else transcoded by Orthanc to the uncompressed syntax it accepted
 *   (transcode.ts); else it is a failed sub-operation (PS3.4 C.4.2.3.1), the others go on.
 * - A destination that does not answer fails within Gateway.Move.ConnectTimeoutSeconds.
 * - Pending responses every Gateway.Move.PendingEvery sub-operations and every
 *   Gateway.Move.PendingIntervalSeconds; C-CANCEL stops after the current sub-operation (0xFE00).
 * - Up to Gateway.Move.Parallelism instances are requested from Orthanc ahead of the one being sent.
 */
import type { DicomModality } from "../config/types.ts";
import { silentLogger, type Logger } from "../shared/log.ts";
import type { ResolvedInstance } from "./resolve.ts";
import { aeTitlesEqual } from "../tenancy/ae-title.ts";
import type { DimseHandler, DimseRequest, DimseResponder } from "../net/association.ts";
import { CommandField, Status } from "../net/constants.ts";
import { AssociationError, AssociationRejectedError, RequestorAssociation } from "../net/requestor.ts";
import { errorComment, failure, type Failure } from "./error-comment.ts";
import { RetrieveRecorder } from "./retrieve-metrics.ts";
import { pinned } from "../orthanc/nodes.ts";
import type { SendPlan } from "./retrieve-stream.ts";
import { answerEndedEarly, DEFAULT_MOVE_SETTINGS, failureOf, resolveRequest, storeStatusFailure, SubOperationRun, type RetrieveContext } from "./suboperations.ts";
import { planTransfer, TRANSCODING_TARGETS } from "./transcode.ts";

/** The modality a tenant may move to under this AE title, or why not. */
export function resolveDestination(
  ctx: Pick<RetrieveContext, "tenant" | "config">,
  moveDestination: string,
): { modality: DicomModality } | { refused: "unknown" | "not-allowed" } {
  const strict = ctx.config.dicom.strictAetComparison;
  const candidates = ctx.config.modalities.filter((m) => aeTitlesEqual(m.aet, moveDestination, strict));
  if (candidates.length === 0) return { refused: "unknown" };
  const allowed = ctx.tenant.allowedDestinations;
  if (!allowed) return { modality: candidates[0]! };
  const ok = candidates.find((m) => allowed.some((a) => a === m.name || aeTitlesEqual(a, m.aet, strict)));
  return ok ? { modality: ok } : { refused: "not-allowed" };
}

type Proposal = { abstractSyntax: string; transferSyntaxes: string[] };

/** The (SOP class, stored transfer syntax) pair an instance needs contexts for. */
const pairOf = (sopClassUid: string, transferSyntax: string) => `${sopClassUid}|${transferSyntax}`;

/**
 * The presentation contexts to propose, in batches of at most 128 (odd IDs 1-255, PS3.8 9.3.2.2), in the
 * order the instances need them: per (SOP class, stored syntax), the stored syntax alone and the
 * uncompressed ones (the stored one left out), shared between pairs of one class. `batchOf` maps a pair
 * to its batch: a pair's contexts are never split.
 */
function contextsFor(instances: readonly ResolvedInstance[]): { batches: Proposal[][]; batchOf: Map<string, number> } {
  const batches: Proposal[][] = [[]];
  const batchOf = new Map<string, number>();
  const proposed = new Set<string>();
  for (const i of instances) {
    const pair = pairOf(i.sopClassUid, i.transferSyntax);
    if (batchOf.has(pair)) continue;
    const keyOf = (b: number, ts: string[]) => `${b}|${i.sopClassUid}|${ts.join(",")}`;
    const needed = [[i.transferSyntax], TRANSCODING_TARGETS.filter((t) => t !== i.transferSyntax)];
    if (batches.at(-1)!.length + needed.filter((ts) => !proposed.has(keyOf(batches.length - 1, ts))).length > 128) batches.push([]);
    const b = batches.length - 1;
    for (const ts of needed) {
      if (proposed.has(keyOf(b, ts))) continue;
      proposed.add(keyOf(b, ts));
      batches[b]!.push({ abstractSyntax: i.sopClassUid, transferSyntaxes: ts });
    }
    batchOf.set(pair, b);
  }
  return { batches, batchOf };
}

/** Why the destination cannot be used, from the error of its association (comment and detail). */
function unreachableFailure(modality: DicomModality, e: unknown): Failure {
  const detail = e instanceof Error ? e.message : String(e);
  if (e instanceof AssociationRejectedError) return failure(`${modality.aet} rejected the association: ${detail.replace(/^.*?\(/, "(")}`, detail);
  if (e instanceof AssociationError && e.kind === "connect") {
    const code = /: (E[A-Z]+)\b/.exec(detail)?.[1];
    if (code) return failure(`${modality.aet} at ${modality.host}:${modality.port} unreachable: ${code}`, detail);
    return failure(`${modality.aet} did not accept the association within the timeout`, detail);
  }
  return failure(`${modality.aet}: ${detail}`, detail);
}

export function createMoveHandler(shared: RetrieveContext): DimseHandler {
  const log = shared.log ?? silentLogger;
  return async (request: DimseRequest, responder: DimseResponder) => {
    // One Orthanc node for the listing and the fetches (another one if it fails: nodes.ts).
    const ctx: RetrieveContext = { ...shared, orthanc: pinned(shared.orthanc) };
    const settings = ctx.config.move ?? DEFAULT_MOVE_SETTINGS;
    const tenant = ctx.tenant.aet;
    const destinationAe = request.command.moveDestination ?? "";
    // The label is a DicomModalities name, never the peer's text (bounded cardinality).
    const recorder = new RetrieveRecorder(ctx.metrics, tenant, "C-MOVE", "(unknown)");
    const fields = { tenant, callingAe: responder.association.callingAeTitle, destination: destinationAe };
    try {
      const dest = resolveDestination(ctx, destinationAe);
      if ("refused" in dest) {
        // The same comment for both: a tenant learns nothing about other tenants' destinations.
        log.warn("C-MOVE destination refused", { ...fields, reason: dest.refused });
        responder.audit({ destinationAe, destinationRefused: dest.refused });
        await request.dataset?.readAll(1 << 20).catch(() => undefined);
        await responder.respond({ status: Status.MoveDestinationUnknown, errorComment: errorComment(`Move destination ${destinationAe} is unknown to this AE`) });
        return;
      }
      recorder.setDestination(dest.modality.name);
      responder.audit({ destination: dest.modality.name, destinationAe: dest.modality.aet });
      const { keys, scope, instances } = await resolveRequest(ctx, request, responder);
      log.info("C-MOVE", { ...fields, modality: dest.modality.name, queryLevel: keys.level, instances: instances.length });
      const modality = dest.modality;
      const { batches, batchOf } = contextsFor(instances);
      // One association per batch of contexts, opened when first needed (the plan of the first instance
      // waits for it), re-opened once lost; a destination that cannot be reached is tried once.
      let down: Failure | undefined;
      const associations = new Map<number, Promise<RequestorAssociation | undefined>>();
      const open = async (batch: number): Promise<RequestorAssociation | undefined> => {
        if (down) return undefined;
        try {
          const a = await RequestorAssociation.connect({
            host: modality.host,
            port: modality.port,
            calledAeTitle: modality.aet,
            callingAeTitle: ctx.tenant.aet,
            presentationContexts: batches[batch]!,
            maxPduLength: ctx.config.dicom.maximumPduLength,
            connectTimeoutMs: settings.connectTimeoutMs,
            artimTimeoutMs: Math.max(settings.connectTimeoutMs, 5000),
          });
          for (const r of a.rejectedContexts) {
            const proposal = batches[batch]!.find((c, i) => c.abstractSyntax === r.abstractSyntax && r.id === 2 * i + 1);
            log.debug("C-MOVE destination refused a presentation context", { tenant, modality: modality.name, sopClass: r.abstractSyntax, transferSyntaxes: proposal?.transferSyntaxes, result: r.result });
          }
          return a;
        } catch (e) {
          down ??= unreachableFailure(modality, e);
          log.warn("C-MOVE destination unreachable", { tenant, modality: modality.name, error: down.detail });
          return undefined;
        }
      };
      const reopen = (batch: number) => {
        const p = open(batch);
        associations.set(batch, p);
        return p;
      };
      const connect = (batch: number): Promise<RequestorAssociation | undefined> => {
        const known = associations.get(batch);
        if (!known) return reopen(batch);
        // A lost association is opened again once: a second caller finds the new one in the map.
        return known.then((a) => (!a || a.isEstablished ? a : associations.get(batch) === known ? reopen(batch) : connect(batch)));
      };
      const plan = async (instance: ResolvedInstance): Promise<SendPlan> => {
        const batch = batchOf.get(pairOf(instance.sopClassUid, instance.transferSyntax)) ?? 0;
        const a = await connect(batch);
        if (!a) return { as: "none", failure: down ?? failure(`${modality.aet} is unreachable`) };
        return planTransfer(ctx.orthanc, instance, (ts) => a.findContext(instance.sopClassUid, ts) !== undefined, modality.aet);
      };
      const run = await SubOperationRun.begin({ ctx, service: "C-MOVE", request, responder, instances, scope, settings, pendingTimer: true, prime: true, recorder, log, logFields: { modality: modality.name }, plan, stopWhen: () => down });
      if (run) await performMove(ctx, run, request, responder, modality, connect, associations, batchOf, log);
    } catch (e) {
      // An AssociationError is the destination's association failing: never answered as a cancel.
      if (!(e instanceof AssociationError) && (await answerEndedEarly(e, "C-MOVE", request, responder, log, fields))) return;
      throw e;
    } finally {
      recorder.finished();
    }
  };
}

async function performMove(
  ctx: RetrieveContext,
  run: SubOperationRun,
  request: DimseRequest,
  responder: DimseResponder,
  modality: DicomModality,
  connect: (batch: number) => Promise<RequestorAssociation | undefined>,
  associations: Map<number, Promise<RequestorAssociation | undefined>>,
  batchOf: Map<string, number>,
  log: Logger,
): Promise<void> {
  const originator = { moveOriginatorAeTitle: responder.association.callingAeTitle, moveOriginatorMessageId: request.command.messageId ?? 0 };
  const priority = request.command.priority ?? 0;
  let inUse = -1;
  try {
    for (;;) {
      const item = await run.next();
      if (!item) break;
      const { instance, fetched } = item;
      const sopClass = fetched.meta.sopClassUid || instance.sopClassUid;
      const ts = fetched.meta.transferSyntaxUid;
      const batch = batchOf.get(pairOf(instance.sopClassUid, instance.transferSyntax)) ?? -1;
      // The association of an earlier batch is no longer needed: release it.
      if (batch > inUse) {
        const previous = associations.get(inUse);
        if (previous) void previous.then((a) => a?.release());
        inUse = batch;
      }
      const a = batch >= 0 ? await connect(batch) : undefined;
      const pc = a?.findContext(sopClass, ts);
      run.recorder.subOperationStarted();
      if (!a || !pc) {
        fetched.discard();
        const down = run.stopped();
        if (down) {
          // Nothing more can be sent: every remaining sub-operation fails at once.
          run.failRemaining(instance, down);
          break;
        }
        await run.failed(instance, failure(`${modality.aet} refused the context for the instance's syntax`, `${modality.aet} accepted no context for ${sopClass} in ${ts} (instance ${instance.sopInstanceUid})`), item.plan);
        continue;
      }
      let status: number | undefined;
      let why: Failure | undefined;
      let sending = fetched;
      for (let [assoc, context, again] = [a, pc, true]; ; ) {
        try {
          const rsp = await assoc.request(
            context.id,
            { commandField: CommandField.CStoreRQ, affectedSopClassUid: sopClass, affectedSopInstanceUid: instance.sopInstanceUid, priority, ...originator },
            sending.dataset,
          );
          status = rsp.status;
          why = status !== Status.Success ? storeStatusFailure(modality.aet, status, rsp.errorComment) : undefined;
          break;
        } catch (e) {
          sending.discard();
          why = failureOf(e, `sending instance ${instance.sopInstanceUid} to ${modality.aet}`);
          const broken = sending.sourceError;
          if (!broken || !again) {
            log.warn("C-MOVE sub-operation failed", { tenant: ctx.tenant.aet, modality: modality.name, sopInstanceUid: instance.sopInstanceUid, error: why.detail });
            break;
          }
          // Orthanc's stream broke in the middle of the instance (its node died): the destination never had a
          // whole instance (the association was aborted), so it is fetched again, from another node of a
          // cluster, as it was planned (the same transcoding: the same presentation context), and sent once
          // more on the batch's association, opened again.
          again = false;
          log.warn("C-MOVE: Orthanc's stream of an instance broke, fetching it again", { tenant: ctx.tenant.aet, modality: modality.name, sopInstanceUid: instance.sopInstanceUid, transcodedTo: sending.transcodedTo, error: broken.message });
          const retry = await run.refetch(sending, broken).catch((re: unknown) => (re instanceof Error ? re : new Error(String(re))));
          const reopened = retry instanceof Error ? undefined : await connect(batch);
          const reContext = reopened?.findContext(sopClass, ts);
          if (retry instanceof Error || !reopened || !reContext) {
            if (!(retry instanceof Error)) retry.discard();
            why =
              retry instanceof Error
                ? failureOf(retry, `fetching instance ${instance.sopInstanceUid} again after Orthanc's stream broke`)
                : (run.stopped() ?? failure(`${modality.aet} could not be reached again`, `${modality.aet} accepted no context for ${sopClass} in ${ts} on the association opened again (instance ${instance.sopInstanceUid})`));
            log.warn("C-MOVE sub-operation failed", { tenant: ctx.tenant.aet, modality: modality.name, sopInstanceUid: instance.sopInstanceUid, error: why.detail });
            break;
          }
          [sending, assoc, context] = [retry, reopened, reContext];
        }
      }
      await run.sent(instance, status, sending.bytes, sending.transcodedTo !== undefined, why);
    }
  } finally {
    await run.stop();
    for (const p of associations.values()) void p.then((a) => a?.release());
  }
  await run.finish();
}
