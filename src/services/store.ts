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
import { OrthancError } from "../orthanc/client.ts";
import { orthancIds } from "../orthanc/identity.ts";
import type { Labeler } from "../orthanc/labeler.ts";
import type { OrthancApi } from "../orthanc/nodes.ts";
import { isPermanentRejection, storedIds, uploadLabeled } from "../orthanc/store.ts";
import { createHash } from "node:crypto";
import type { Forwarder } from "../spool/forwarder.ts";
import { newSpoolId, SpoolDiskError, SpoolQuotaError, TenantSpool, type ReceivedFile } from "../spool/spool.ts";
import { DatasetRefusal, InstanceReader, type InstanceIdentity } from "../dicom/dataset-reader.ts";
import type { IsolationGuard, IsolationVerdict } from "../tenancy/isolation.ts";
import type { UidRegistry } from "../tenancy/ownership.ts";
import { settleStrictUpload, type ContentDigest } from "../tenancy/strict-upload.ts";
import type { DimseHandler, DimseResponder } from "../net/association.ts";
import { Status } from "../net/constants.ts";

export interface StoreEvents {
  /** Bytes of a data set fully received (acknowledged or not). */
  received?(bytes: number): void;
  /** Success was answered. */
  acknowledged?(bytes: number): void;
  /** A failure status was answered. */
  refused?(status: number, reason: string): void;
  /** Strict isolation refused an instance (also reported through refused). */
  isolationRefused?(reason: string, identity: InstanceIdentity): void;
  /** Strict isolation allowed an instance with a remark (the same UID under another PatientID of the tenant). */
  isolationWarning?(warning: string, identity: InstanceIdentity): void;
  /** Orthanc filed an instance elsewhere than checked (Sync mode); `deleted`: the gateway undid its upload. */
  misplaced?(reason: string, deleted: boolean): void;
}

export interface StoreServiceDeps {
  tenant: TenantConfig;
  spool: TenantSpool;
  orthanc: OrthancApi;
  labeler: Labeler;
  forwarder: Forwarder;
  /** Every instance between its check and Orthanc holds its UIDs here (Strict and Shared tenants alike). */
  registry: UidRegistry;
  /** Present when the tenant's Isolation is Strict. */
  guard?: IsolationGuard;
  /** Orthanc's `DefaultEncoding`: how Orthanc reads a data set without (0008,0005). */
  defaultEncoding: string;
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

type Fail = (status: number, comment: string, reason?: string) => Promise<void>;

function storeHandler(deps: StoreServiceDeps): DimseHandler {
  const { tenant, spool, events } = deps;
  return async (request, responder) => {
    const cmd = request.command;
    const sopClassUid = cmd.affectedSopClassUid ?? request.presentationContext.abstractSyntax;
    const sopInstanceUid = cmd.affectedSopInstanceUid ?? "";
    const transferSyntaxUid = request.presentationContext.transferSyntax;
    /** ErrorComment is LO (64 characters): the comment says what happened; the log gets the whole reason. */
    const fail: Fail = async (status, comment, reason = comment) => {
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

    // The spool record's id also keys what the instance holds in the UID registry until it is in Orthanc.
    const id = newSpoolId();
    // The strict reader sees every chunk as it reaches the spool. As soon as PatientID and the UIDs have
    // arrived, the instance is admitted (Strict isolation's lookups in Orthanc start) while the rest of the
    // data set still arrives; the reader's verdict on the whole data set comes at its end.
    const reader = new InstanceReader(transferSyntaxUid, { defaultEncoding: deps.defaultEncoding });
    let readerRefused = false;
    const observe = (chunk: Uint8Array) => {
      if (readerRefused) return;
      try {
        const pushed = reader.push(chunk);
        if (pushed) return pushed.catch(() => void (readerRefused = true));
      } catch {
        readerRefused = true; // end() gives the refusal
      }
    };
    const admission = reader.identity.then(
      (identity) => (identity.sopInstanceUid === sopInstanceUid ? admit(deps, identity, id, responder) : undefined),
      () => undefined,
    );
    let received: ReceivedFile;
    try {
      // Not durable yet: Spool commits (fsyncs) it below; Sync answers once Orthanc has it and discards it.
      received = await spool.receive({ sopClassUid, sopInstanceUid, transferSyntaxUid, sourceAeTitle: responder.association.callingAeTitle }, request.dataset, { id, observe });
    } catch (e) {
      await admission;
      deps.registry.releaseHold(id);
      if (e instanceof SpoolQuotaError) return fail(Status.OutOfResources, "Gateway spool quota full, retry later", e.message);
      if (e instanceof SpoolDiskError) return fail(Status.OutOfResources, "Gateway spool disk error, retry later", e.message);
      throw e; // the association ended mid-transfer: the partial file is already gone
    }
    events?.received?.(received.size);
    responder.audit({ sopInstanceUid, sopClassUid, bytes: received.size });

    const refuse: Fail = async (status, comment, reason) => {
      await admission; // a check under way may still take a hold: release it after
      deps.registry.releaseHold(id);
      await spool.discard(received);
      return fail(status, comment, reason);
    };
    let identity: InstanceIdentity;
    try {
      identity = await reader.end();
    } catch (e) {
      if (!(e instanceof DatasetRefusal)) throw e;
      return refuse(e.status, e.comment, `refused before acknowledgement: ${e.reason}`);
    }
    if (identity.sopInstanceUid !== sopInstanceUid) {
      return refuse(Status.UnableToProcess, "SOP Instance UID differs from the command", `the data set's SOP Instance UID ${identity.sopInstanceUid} differs from the command's ${sopInstanceUid}`);
    }
    responder.audit({ studyInstanceUid: identity.studyInstanceUid, seriesInstanceUid: identity.seriesInstanceUid, patientId: identity.patientId });
    const admitted = (await admission) ?? (await admit(deps, identity, id, responder));
    if ("refusal" in admitted) return refuse(admitted.refusal.status, admitted.refusal.comment, admitted.refusal.reason);
    const verdict = admitted.verdict;

    if (tenant.forwarding === "Sync") {
      try {
        return await storeSync(deps, received, responder, sopInstanceUid, fail, verdict, identity);
      } finally {
        deps.registry.releaseHold(id);
      }
    }

    try {
      const entry = await spool.commit(received, {
        sopClassUid,
        sopInstanceUid,
        transferSyntaxUid,
        callingAeTitle: responder.association.callingAeTitle,
        peer: `${responder.association.peer.address}:${responder.association.peer.port}`,
        receivedAt: new Date().toISOString(),
        patientId: identity.patientId,
        studyInstanceUid: identity.studyInstanceUid,
        seriesInstanceUid: identity.seriesInstanceUid,
        ...(verdict ? { isolation: verdict.checked ? "checked" : "unchecked", instanceIsNew: verdict.instanceIsNew } : {}),
      });
      deps.forwarder.add(tenant, spool, entry);
    } catch (e) {
      return refuse(Status.OutOfResources, "Gateway spool disk error, retry later", e instanceof Error ? e.message : String(e));
    }
    events?.acknowledged?.(received.size);
    await responder.respond({ status: Status.Success, affectedSopInstanceUid: sopInstanceUid });
  };
}

type Admission = { refusal: { status: number; comment: string; reason: string } } | { verdict?: Extract<IsolationVerdict, { ok: true }> };

/**
 * Admits an instance whose identity is known: Strict tenants through their isolation guard; every tenant's
 * instance then holds its UIDs (UidRegistry) until it is in Orthanc, refused or quarantined.
 */
function admit(deps: StoreServiceDeps, identity: InstanceIdentity, holdKey: string, responder: DimseResponder): Promise<Admission> {
  if (deps.guard) return checkIsolation(deps, identity, holdKey, responder);
  deps.registry.hold(holdKey, deps.tenant.aet, identity);
  return Promise.resolve({});
}

/**
 * Strict isolation at C-STORE time: may this tenant store an instance with these UIDs? Orthanc
 * unreachable: Sync fails (nothing can be stored anyway); Spool checks the gateway's own records now and
 * Orthanc before forwarding (the forwarder quarantines what turns out to conflict, a cause the gateway
 * could not know at C-STORE time).
 */
async function checkIsolation(
  deps: StoreServiceDeps,
  identity: InstanceIdentity,
  holdKey: string,
  responder: DimseResponder,
): Promise<Admission> {
  let verdict: IsolationVerdict;
  try {
    try {
      verdict = await deps.guard!.check(identity, holdKey);
    } catch (e) {
      if (!(e instanceof OrthancError)) throw e;
      if (deps.tenant.forwarding === "Sync") {
        return { refusal: { status: Status.OutOfResources, comment: "Orthanc unavailable, not stored; retry later", reason: `isolation check impossible: ${e.message}` } };
      }
      verdict = await deps.guard!.check(identity, holdKey, { offline: true });
    }
  } catch (e) {
    // The check itself failed: nothing was acknowledged.
    return { refusal: { status: Status.OutOfResources, comment: "Isolation check failed, retry later", reason: `isolation check failed: ${(e as Error).message}` } };
  }
  if (verdict.ok && !verdict.checked && deps.tenant.forwarding === "Sync") {
    // Orthanc cannot keep the ownership records: Sync cannot store now (Spool decides again before the upload).
    deps.registry.releaseHold(holdKey);
    return { refusal: { status: Status.OutOfResources, comment: "Orthanc not ready for Strict isolation; retry later", reason: `isolation check impossible: ${deps.guard!.unusable ?? "Orthanc unreachable"}` } };
  }
  if (verdict.ok) {
    for (const w of verdict.warnings) deps.events?.isolationWarning?.(w, identity);
    if (verdict.warnings.length > 0) responder.audit({ isolationWarning: verdict.warnings.join("; ") });
    return { verdict };
  }
  deps.events?.isolationRefused?.(verdict.reason, identity);
  responder.audit({ isolation: "refused", isolationReason: verdict.reason });
  return { refusal: { status: Status.NotAuthorized, comment: `Not authorized: ${verdict.level} belongs to another tenant`, reason: `isolation: ${verdict.reason}` } };
}

async function storeSync(
  deps: StoreServiceDeps,
  received: ReceivedFile,
  responder: DimseResponder,
  sopInstanceUid: string,
  fail: Fail,
  verdict: Extract<IsolationVerdict, { ok: true }> | undefined,
  identity: InstanceIdentity,
): Promise<void> {
  try {
    // The labels are pipelined behind the upload: one round trip for both. Strict isolation: after the
    // ownership claim (guard.settle), one more round trip; across a link the ownership records come back
    // with the upload.
    const strict = deps.guard !== undefined && verdict !== undefined;
    const plan = deps.labeler.plan(verdict?.ids ?? orthancIds(identity), deps.tenant);
    const up = await uploadLabeled(deps.orthanc, deps.labeler, await deps.spool.bytesOf(received), plan, {
      labelsLater: strict,
      ...(strict && deps.orthanc.linkBound ? { reads: deps.guard!.recordReads(plan.ids) } : {}),
    });
    const stored = up.stored;
    if (deps.guard && verdict) {
      const sent = async (): Promise<ContentDigest> => {
        const b = await deps.spool.bytesOf(received);
        return b instanceof Uint8Array ? { size: b.length, md5: createHash("md5").update(b).digest("hex") } : { size: b.size, md5: await TenantSpool.md5Of(b) };
      };
      const settlement = await settleStrictUpload({ orthanc: deps.orthanc, guard: deps.guard, labeler: deps.labeler, identity, plan, up, instanceIsNew: verdict.instanceIsNew, sent });
      if (!settlement.ok) {
        if (settlement.kind === "placement") {
          deps.events?.misplaced?.(settlement.reason, settlement.deleted);
          return fail(Status.ProcessingFailure, "Orthanc filed it elsewhere than checked (see log)", `isolation: ${settlement.reason}; ${settlement.deleted ? "the upload was undone" : "left in Orthanc as it was (not created by this upload)"}`);
        }
        if (settlement.kind === "replay") {
          const reason = `Orthanc already holds other bytes under SOP Instance UID ${sopInstanceUid}, stored by another writer after the check`;
          deps.events?.isolationRefused?.(reason, identity);
          responder.audit({ isolation: "refused", isolationReason: reason });
          return fail(Status.NotAuthorized, "Not authorized: Instance belongs to another tenant", `isolation: ${reason}`);
        }
        deps.events?.isolationRefused?.(settlement.reason, identity);
        responder.audit({ isolation: "refused", isolationReason: settlement.reason });
        return fail(Status.NotAuthorized, `Not authorized: ${settlement.level} belongs to another tenant`, `isolation: ${settlement.reason}; ${settlement.deleted ? "the upload was undone" : "left in Orthanc as it was"}`);
      }
      up.labeled = settlement.labeled;
    }
    // The pipelined labels did not all land (Orthanc filed a Shared tenant's instance under other IDs...): at Orthanc's IDs.
    if (!up.labeled) await deps.labeler.apply(storedIds(stored), deps.tenant);
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
