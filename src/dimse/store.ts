/**
 * Storage service, SCP role (PS3.4 Annex B; C-STORE PS3.7 9.1.1): the data set is streamed to the
 * tenant's spool as it arrives, never held whole in memory, and the bytes stay as the modality sent
 * them. Success is answered only when the instance is safe:
 *   Spool — its record is in the tenant's spool log and fdatasync'd (the forwarder takes it from there);
 *   Sync  — Orthanc has stored and labeled it.
 * Failure statuses (PS3.4 B.2.3): 0xA700 Refused: Out of Resources (quota, disk, Orthanc unavailable),
 * 0xC000 Error: Cannot understand (no data set, Orthanc refuses the content), and with Strict isolation
 * 0x0124 Refused: Not Authorized (PS3.7 C.5.11) for an instance that would land in another tenant's
 * study, series or instance — always with an ErrorComment.
 */
import type { TenantConfig } from "../config/types.ts";
import { isValidUid } from "../dicom/uids.ts";
import { OrthancError, type OrthancClient } from "../orthanc/client.ts";
import { isPermanentRejection, uploadFile, type Labeler } from "../orthanc/store.ts";
import type { Forwarder } from "../spool/forwarder.ts";
import { HEAD_BYTES, SpoolDiskError, SpoolQuotaError, type ReceivedFile, type TenantSpool } from "../spool/spool.ts";
import { DatasetHeadError, readDatasetHead } from "../dicom/dataset-head.ts";
import { orthancIds, type OrthancIds } from "../orthanc/identity.ts";
import type { IsolationGuard } from "../tenancy/isolation.ts";
import type { DimseHandler, DimseResponder } from "./association.ts";
import { Status } from "./constants.ts";

export interface StoreEvents {
  /** Bytes of a data set fully received (acknowledged or not). */
  received?(bytes: number): void;
  /** Success was answered. */
  acknowledged?(bytes: number): void;
  /** A failure status was answered. */
  refused?(status: number, reason: string): void;
  /** Strict isolation refused an instance (also reported through refused). */
  isolationRefused?(reason: string, ids: OrthancIds): void;
}

export interface StoreServiceDeps {
  tenant: TenantConfig;
  spool: TenantSpool;
  orthanc: OrthancClient;
  labeler: Labeler;
  forwarder: Forwarder;
  /** Present when the tenant's Isolation is Strict. */
  guard?: IsolationGuard;
  events?: StoreEvents;
}

export function createStoreHandler(deps: StoreServiceDeps): DimseHandler {
  const handle = storeHandler(deps);
  // Uploads give way while data sets arrive (receive priority, see Forwarder).
  return async (request, responder) => {
    deps.forwarder.arrivalStarted();
    try {
      await handle(request, responder);
    } finally {
      deps.forwarder.arrivalEnded();
    }
  };
}

function storeHandler(deps: StoreServiceDeps): DimseHandler {
  const { tenant, spool, events } = deps;
  return async (request, responder) => {
    const cmd = request.command;
    const sopClassUid = cmd.affectedSopClassUid ?? request.presentationContext.abstractSyntax;
    const sopInstanceUid = cmd.affectedSopInstanceUid ?? "";
    /** ErrorComment is LO (64 characters): the comment says what happened; the log gets the whole reason. */
    const fail = async (status: number, comment: string, reason = comment) => {
      request.dataset?.discard();
      events?.refused?.(status, reason);
      await responder.respond({ status, errorComment: truncate(comment), affectedSopInstanceUid: sopInstanceUid || undefined });
    };
    if (!request.dataset) return fail(Status.UnableToProcess, "C-STORE-RQ without a data set");
    if (!isValidUid(sopInstanceUid)) return fail(Status.UnableToProcess, `invalid Affected SOP Instance UID "${sopInstanceUid.slice(0, 64)}"`);
    if (!spool.hasRoom()) {
      return fail(
        Status.OutOfResources,
        "Gateway spool quota full, retry later",
        `spool of ${tenant.aet} is full (quota ${Math.round(spool.quotaBytes / 1048576)} MB): Orthanc is not taking instances fast enough`,
      );
    }

    let received: ReceivedFile;
    try {
      // Not durable yet: Spool commits (fsyncs) it below; Sync answers once Orthanc has it and discards it.
      received = await spool.receive(
        { sopClassUid, sopInstanceUid, transferSyntaxUid: request.presentationContext.transferSyntax, sourceAeTitle: responder.association.callingAeTitle },
        request.dataset,
      );
    } catch (e) {
      if (e instanceof SpoolQuotaError) return fail(Status.OutOfResources, "Gateway spool quota full, retry later", e.message);
      if (e instanceof SpoolDiskError) return fail(Status.OutOfResources, "Gateway spool disk error, retry later", e.message);
      throw e; // the association ended mid-transfer: the partial file is already gone
    }
    events?.received?.(received.size);
    responder.audit({ sopInstanceUid, sopClassUid, bytes: received.size });

    let ids: OrthancIds | undefined;
    if (deps.guard) {
      const checked = await checkIsolation(deps, received, request.presentationContext.transferSyntax, sopInstanceUid, responder);
      if ("refusal" in checked) {
        await spool.discard(received);
        return fail(checked.refusal.status, checked.refusal.comment, checked.refusal.reason);
      }
      ids = checked.ids;
    }

    if (tenant.forwarding === "Sync") return storeSync(deps, received, responder, sopInstanceUid, fail, ids);

    try {
      const entry = await spool.commit(received, {
        sopClassUid,
        sopInstanceUid,
        transferSyntaxUid: request.presentationContext.transferSyntax,
        callingAeTitle: responder.association.callingAeTitle,
        peer: `${responder.association.peer.address}:${responder.association.peer.port}`,
        receivedAt: new Date().toISOString(),
        ...(ids ? { orthancIds: ids } : {}),
      });
      deps.forwarder.add(tenant, spool, entry);
    } catch (e) {
      await spool.discard(received);
      return fail(Status.OutOfResources, "Gateway spool disk error, retry later", e instanceof Error ? e.message : String(e));
    }
    events?.acknowledged?.(received.size);
    await responder.respond({ status: Status.Success, affectedSopInstanceUid: sopInstanceUid });
  };
}

/**
 * Strict isolation at C-STORE time: where would Orthanc file this instance, and may this tenant store
 * there? Orthanc unreachable: Sync fails (nothing can be stored anyway); Spool checks the gateway's own
 * claims now and Orthanc when forwarding (the forwarder quarantines what turns out to conflict).
 */
async function checkIsolation(
  deps: StoreServiceDeps,
  received: ReceivedFile,
  transferSyntax: string,
  sopInstanceUid: string,
  responder: DimseResponder,
): Promise<{ refusal: { status: number; comment: string; reason: string } } | { ids: OrthancIds }> {
  let ids: OrthancIds;
  try {
    let head;
    try {
      head = readDatasetHead(received.head, transferSyntax);
    } catch (e) {
      // Long private sequences before the UIDs: read further from the spooled file.
      if (!(e instanceof DatasetHeadError && e.truncated && received.head.length === HEAD_BYTES)) throw e;
      head = readDatasetHead(await deps.spool.datasetBytes(received, 1 << 20), transferSyntax);
    }
    if (head.sopInstanceUid !== sopInstanceUid) {
      return {
        refusal: {
          status: Status.UnableToProcess,
          comment: "SOP Instance UID differs from the command",
          reason: `the data set's SOP Instance UID ${head.sopInstanceUid} differs from the command's ${sopInstanceUid}`,
        },
      };
    }
    ids = orthancIds(head);
    responder.audit({ studyInstanceUid: head.studyInstanceUid, seriesInstanceUid: head.seriesInstanceUid, patientId: head.patientId });
  } catch (e) {
    if (!(e instanceof DatasetHeadError)) throw e;
    return { refusal: { status: Status.UnableToProcess, comment: "Cannot read Study/Series/SOP Instance UID", reason: `cannot place the instance: ${e.message}` } };
  }
  let verdict;
  try {
    verdict = await deps.guard!.check(ids);
  } catch (e) {
    if (!(e instanceof OrthancError)) {
      // The claims file could not be written (disk full, permissions): nothing was acknowledged.
      return { refusal: { status: Status.OutOfResources, comment: "Gateway spool disk error, retry later", reason: `cannot record the claim: ${(e as Error).message}` } };
    }
    if (deps.tenant.forwarding === "Sync") {
      return { refusal: { status: Status.OutOfResources, comment: "Orthanc unavailable, not stored; retry later", reason: `isolation check impossible: ${e.message}` } };
    }
    verdict = await deps.guard!.check(ids, { claimsOnly: true });
  }
  if (verdict.ok) return { ids };
  deps.events?.isolationRefused?.(verdict.reason, ids);
  responder.audit({ isolation: "refused", isolationReason: verdict.reason });
  return { refusal: { status: Status.NotAuthorized, comment: `Not authorized: ${verdict.level} belongs to another tenant`, reason: `isolation: ${verdict.reason}` } };
}

async function storeSync(
  deps: StoreServiceDeps,
  received: ReceivedFile,
  responder: DimseResponder,
  sopInstanceUid: string,
  fail: (status: number, comment: string, reason?: string) => Promise<void>,
  ids?: OrthancIds,
): Promise<void> {
  try {
    const stored = await uploadFile(deps.orthanc, await deps.spool.bytesOf(received));
    if (ids && (stored.parentStudy !== ids.study || stored.parentSeries !== ids.series || stored.id !== ids.instance)) {
      if (stored.status === "Success") await deps.orthanc.delete(`/instances/${stored.id}`);
      return fail(Status.NotAuthorized, "Not authorized: unexpected placement in Orthanc", `isolation: Orthanc filed the instance under study ${stored.parentStudy}, not the checked ${ids.study}`);
    }
    await deps.labeler.apply(stored, deps.tenant);
  } catch (e) {
    const message = e instanceof Error ? e.message : String(e);
    if (isPermanentRejection(e)) return fail(Status.UnableToProcess, "Orthanc refused the instance (see gateway log)", `Orthanc refused the instance: ${message}`);
    if (e instanceof OrthancError) return fail(Status.OutOfResources, "Orthanc unavailable, not stored; retry later", `Orthanc unavailable, instance not stored: ${message}`);
    if (e instanceof SpoolDiskError) return fail(Status.OutOfResources, "Gateway spool disk error, retry later", message);
    throw e;
  } finally {
    await deps.spool.discard(received);
  }
  deps.events?.acknowledged?.(received.size);
  await responder.respond({ status: Status.Success, affectedSopInstanceUid: sopInstanceUid });
}

/** ErrorComment is LO: 64 characters at most (PS3.7 C.4.x, PS3.5 6.2). */
function truncate(s: string): string {
  return s.length <= 64 ? s : s.slice(0, 61) + "...";
}
