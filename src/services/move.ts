/**
 * C-MOVE SCP (PS3.4 C.4.2), Patient Root and Study Root: the instances of the request, resolved in
 * the tenant's label scope, are sent by the gateway itself to the move destination in C-STORE
 * sub-operations on an association it opens (called AE = the destination's AE title, calling AE =
 * the tenant's AE title), each instance streamed from Orthanc's GET /instances/{id}/file.
 *
 * - The destination must be a DicomModalities entry, and one of the tenant's AllowedDestinations
 *   when that list is set; otherwise 0xA801 at once.
 * - Presentation contexts: one per (SOP class, transfer syntax) of the instances, each proposing the
 *   instance's own transfer syntax (nothing is transcoded); an instance whose context the destination
 *   refused is a failed sub-operation (PS3.4 C.4.2.3.1).
 * - A destination that does not answer fails within Gateway.Move.ConnectTimeoutSeconds.
 * - Pending responses every Gateway.Move.PendingEvery sub-operations and every
 *   Gateway.Move.PendingIntervalSeconds; C-CANCEL stops after the current sub-operation (0xFE00).
 * - Up to Gateway.Move.Parallelism instances are requested from Orthanc ahead of the one being sent.
 */
import type { DicomModality, MoveSettings } from "../config/types.ts";
import { silentLogger, type Logger } from "../shared/log.ts";
import type { ResolvedInstance } from "./resolve.ts";
import { aeTitlesEqual } from "../tenancy/ae-title.ts";
import type { DimseHandler, DimseRequest, DimseResponder } from "../net/association.ts";
import { CommandField, Status } from "../net/constants.ts";
import { AssociationError, RequestorAssociation } from "../net/requestor.ts";
import { RetrieveRecorder } from "./retrieve-metrics.ts";
import { pinned } from "../orthanc/nodes.ts";
import { answerEndedEarly, DEFAULT_MOVE_SETTINGS, resolveRequest, storeStatusText, SubOperationRun, type RetrieveContext } from "./suboperations.ts";

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

/** One presentation context per (SOP class, transfer syntax), in the order the instances need them. */
function contextsFor(instances: readonly ResolvedInstance[]): { abstractSyntax: string; transferSyntaxes: string[] }[][] {
  const seen = new Set<string>();
  const all: { abstractSyntax: string; transferSyntaxes: string[] }[] = [];
  for (const i of instances) {
    const key = `${i.sopClassUid}|${i.transferSyntax}`;
    if (seen.has(key)) continue;
    seen.add(key);
    all.push({ abstractSyntax: i.sopClassUid, transferSyntaxes: [i.transferSyntax] });
  }
  // At most 128 presentation contexts per association (odd IDs 1-255, PS3.8 9.3.2.2).
  const batches: (typeof all)[] = [];
  for (let k = 0; k < all.length; k += 128) batches.push(all.slice(k, k + 128));
  return batches;
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
        await responder.respond({ status: Status.MoveDestinationUnknown, errorComment: `Move destination ${destinationAe} is unknown to this AE` });
        return;
      }
      recorder.setDestination(dest.modality.name);
      responder.audit({ destination: dest.modality.name, destinationAe: dest.modality.aet });
      const { keys, scope, instances } = await resolveRequest(ctx, request, responder);
      log.info("C-MOVE", { ...fields, modality: dest.modality.name, level: keys.level, instances: instances.length });
      const run = await SubOperationRun.begin({ ctx, service: "C-MOVE", request, responder, instances, scope, settings, pendingTimer: true, prime: true, recorder, log, logFields: { modality: dest.modality.name } });
      if (run) await performMove(ctx, run, request, responder, dest.modality, instances, settings, recorder, log);
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
  instances: ResolvedInstance[],
  settings: MoveSettings,
  recorder: RetrieveRecorder,
  log: Logger,
): Promise<void> {
  // The run primed the fetcher: Orthanc starts sending while the destination association is opened.
  const batches = contextsFor(instances);
  const originator = { moveOriginatorAeTitle: responder.association.callingAeTitle, moveOriginatorMessageId: request.command.messageId ?? 0 };
  const priority = request.command.priority ?? 0;
  let unreachable: string | undefined;

  const connect = async (batch: number): Promise<RequestorAssociation | undefined> => {
    if (unreachable) return undefined;
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
        log.warn("C-MOVE destination refused a presentation context", { tenant: ctx.tenant.aet, modality: modality.name, sopClass: r.abstractSyntax, transferSyntax: batches[batch]!.find((c) => c.abstractSyntax === r.abstractSyntax)?.transferSyntaxes[0], result: r.result });
      }
      return a;
    } catch (e) {
      unreachable = e instanceof Error ? e.message : String(e);
      log.warn("C-MOVE destination unreachable", { tenant: ctx.tenant.aet, modality: modality.name, error: unreachable });
      return undefined;
    }
  };
  /** The association for a batch of contexts: reused while open, re-opened once lost. */
  let current: { batch: number; promise: Promise<RequestorAssociation | undefined> } | undefined;
  const open = async (batch: number): Promise<RequestorAssociation | undefined> => {
    if (current && current.batch === batch) {
      const a = await current.promise;
      if (!a || a.isEstablished) return a;
    } else if (current) {
      const previous = await current.promise;
      if (previous) void previous.release();
    }
    current = { batch, promise: connect(batch) };
    return current.promise;
  };
  void open(0); // in parallel with the first download

  try {
    for (;;) {
      const item = await run.next();
      if (!item) break;
      const { instance, fetched } = item;
      const sopClass = fetched.meta.sopClassUid || instance.sopClassUid;
      const ts = fetched.meta.transferSyntaxUid;
      const batch = batches.findIndex((b) => b.some((c) => c.abstractSyntax === sopClass && c.transferSyntaxes[0] === ts));
      const a = batch >= 0 ? await open(batch) : undefined;
      const pc = a?.findContext(sopClass, ts);
      recorder.subOperationStarted();
      if (!a || !pc) {
        fetched.discard();
        const error = !a
          ? unreachable ?? `no presentation context for ${sopClass}`
          : `${modality.aet} does not accept ${sopClass} in transfer syntax ${ts}`;
        if (unreachable) {
          // Nothing more can be sent: every remaining sub-operation fails at once.
          run.failRemaining(instance, error);
          break;
        }
        await run.failed(instance, error);
        continue;
      }
      let status: number | undefined;
      let sending = fetched;
      for (let [assoc, context, again] = [a, pc, true]; ; ) {
        try {
          const rsp = await assoc.request(
            context.id,
            { commandField: CommandField.CStoreRQ, affectedSopClassUid: sopClass, affectedSopInstanceUid: instance.sopInstanceUid, priority, ...originator },
            sending.dataset,
          );
          status = rsp.status;
          if (status !== Status.Success) run.lastError = `${modality.aet} answered ${storeStatusText(status, rsp.errorComment)}`;
          break;
        } catch (e) {
          sending.discard();
          run.lastError = e instanceof Error ? e.message : String(e);
          const broken = sending.sourceError;
          if (!broken || !again) {
            log.warn("C-MOVE sub-operation failed", { tenant: ctx.tenant.aet, modality: modality.name, sopInstanceUid: instance.sopInstanceUid, error: run.lastError });
            break;
          }
          // Orthanc's stream broke in the middle of the instance (its node died): the destination never had a
          // whole instance (the association was aborted), so it is fetched again, from another node of a
          // cluster, and sent once more on a new association.
          again = false;
          log.warn("C-MOVE: Orthanc's stream of an instance broke, fetching it again", { tenant: ctx.tenant.aet, modality: modality.name, sopInstanceUid: instance.sopInstanceUid, error: broken.message });
          const retry = await run.refetch(instance, broken).catch((re: unknown) => re as Error);
          const reopened = retry instanceof Error ? undefined : await open(batch);
          const reContext = reopened?.findContext(sopClass, ts);
          if (retry instanceof Error || !reopened || !reContext) {
            if (!(retry instanceof Error)) retry.discard();
            run.lastError = retry instanceof Error ? retry.message : (unreachable ?? `${modality.aet} could not be reached again`);
            log.warn("C-MOVE sub-operation failed", { tenant: ctx.tenant.aet, modality: modality.name, sopInstanceUid: instance.sopInstanceUid, error: run.lastError });
            break;
          }
          [sending, assoc, context] = [retry, reopened, reContext];
        }
      }
      await run.sent(instance, status, sending.bytes);
    }
  } finally {
    await run.stop();
    const last = current ? await current.promise : undefined;
    if (last) void last.release();
  }
  await run.finish();
}
