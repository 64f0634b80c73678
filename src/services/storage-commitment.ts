/**
 * Storage Commitment Push Model SCP (PS3.4 Annex J; IHE RAD-10), one per tenant: a modality asks, with
 * N-ACTION-RQ (action type 1) on the well-known instance 1.2.840.10008.1.20.1.1, whether the gateway
 * takes responsibility for a list of instances; the gateway answers at once (N-ACTION-RSP), then reports
 * with N-EVENT-REPORT-RQ (event type 1 all committed, 2 failures exist, PS3.4 J.3.3.1).
 *
 * Truthful: an instance is committed only when it is in Orthanc within the tenant's label scope, with
 * the SOP class the request names, and, with Gateway.Spool.VerifyIntegrity, its stored file matching the
 * MD5 Orthanc recorded for it (the forwarder compared that one with the received bytes). Otherwise it
 * fails with its PS3.3 C.14.1.1 reason: 0x0112 not there (another tenant's instance is "not there" for
 * this tenant), 0x0119 another SOP class, 0x0110 its integrity check failed, or it was quarantined, or it
 * is still on its way after Gateway.StorageCommitment.WaitSeconds (instances acknowledged into the spool
 * and not yet in Orthanc are waited for: the forwarder tells when each is forwarded), 0x0131 the
 * Transaction UID was already in use.
 *
 * Durable: the request is journaled (spool/commitment-journal.ts, fdatasync'd) before its N-ACTION-RSP;
 * after a restart, every request still owed a report is evaluated again and reported.
 *
 * The report goes on the N-ACTION's association when the requester keeps it open (still open
 * SAME_ASSOCIATION_GRACE_MS after the N-ACTION-RSP: an SCU that releases at once, like Orthanc, is not
 * sent a request while it releases) and the gateway has the SCP role there (PS3.7 D.3.3.4: the default
 * roles, or the requester's SCU role accepted); else on a new association to the requester's AE title
 * found in DicomModalities, calling with the AE title the requester called (PS3.4 J.3.3.1.2 note 2),
 * proposing the SCP role (J.3.3.1.2 note 1), retried with backoff until it is delivered or
 * Gateway.StorageCommitment.ReportExpiryHours have passed.
 *
 * A reload that changes the tenant starts a new SCP while the previous one's associations drain: the new one
 * shares the previous one's journal (one open file, one set of pending requests), resumes only what no SCP
 * of the tenant is working on, and takes over what the previous one has not finished when it stops.
 */
import { join } from "node:path";
import type { DicomModality, DicomSettings, MoveSettings, SpoolSettings, StorageCommitmentSettings, TenantConfig } from "../config/types.ts";
import { SopClass } from "../dicom/sop-classes.ts";
import type { AssociationInfo, DimseHandler, DimseRequest, DimseResponder } from "../net/association.ts";
import type { CommandSet } from "../net/command.ts";
import { Status, TransferSyntax } from "../net/constants.ts";
import type { DimseResult } from "../net/dimse.ts";
import { nEventReportRQ } from "../net/n-service.ts";
import { RequestorAssociation } from "../net/requestor.ts";
import { OrthancError } from "../orthanc/client.ts";
import { pinned, type OrthancApi } from "../orthanc/nodes.ts";
import { silentLogger, type Logger } from "../shared/log.ts";
import { CommitmentJournal, type CommitmentReference, type CommitmentRequest } from "../spool/commitment-journal.ts";
import { backoffDelay, type Forwarder } from "../spool/forwarder.ts";
import { tenantDirectoryName, type TenantSpool } from "../spool/spool.ts";
import { aeTitlesEqual } from "../tenancy/ae-title.ts";
import type { UidRegistry } from "../tenancy/ownership.ts";
import { ActionInformationError, encodeEventInformation, FailureReason, readActionInformation, type CommitmentResult, type FailureReasonCode } from "./commitment-info.ts";
import { errorComment } from "./error-comment.ts";
import { resolveInstances, tenantLabelScope, type ResolvedInstance } from "./resolve.ts";

/** The well-known SOP instance of the Push Model (PS3.4 J.3.5). */
export const STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1";
/** Action Type ID 1: Request Storage Commitment (PS3.4 J.3.2.1). */
const REQUEST_STORAGE_COMMITMENT = 1;
/** How long after the N-ACTION-RSP the requester must still hold the association for the report to use it. */
export const SAME_ASSOCIATION_GRACE_MS = 1000;
/** Largest Action Information accepted (~40 000 references). */
const MAX_ACTION_INFORMATION = 4 << 20;
/** Instances still on their way are looked for again at least this often (besides the forwarder's word). */
const RECHECK_MS = 5000;
/** SOP Instance UIDs per /tools/find call. */
const LOOKUP_BATCH = 100;
/** How long a stop waits for the response to a report already sent on a new association. */
const REPORT_STOP_GRACE_MS = 5000;
/** Backoff of a report that could not be delivered: from 2 s, doubling, to 5 min. */
const RETRY_BASE_MS = 2000;
const RETRY_MAX_MS = 300_000;

export type ReportPath = "same-association" | "new-association";

/** The N-EVENT-REPORT-RQ of a result, encoded in the transfer syntax of the presentation context it goes on. */
type ReportIn = (transferSyntax: string) => { command: CommandSet; dataset: Uint8Array };

/** What the gateway's observers are told (logs, metrics, audit: gateway/observers.ts). */
export interface StorageCommitmentEvents {
  /** An N-ACTION-RQ was refused (its status and ErrorComment went back). */
  refused?(status: number, comment: string, association: AssociationInfo): void;
  /** An N-ACTION-RQ was acknowledged; `repeated`: the same request again (a lost response), not journaled twice. */
  requested?(request: CommitmentRequest, repeated: boolean): void;
  /** The request's instances are decided; `notes`: why each failed one failed, for the log. */
  evaluated?(request: CommitmentRequest, result: CommitmentResult, notes: ReadonlyMap<string, string>): void;
  /** The report reached the requester, which answered `status`. */
  reported?(request: CommitmentRequest, result: CommitmentResult, path: ReportPath, status: number, attempts: number): void;
  /** The report could not be delivered; it is tried again in `retryInMs`. */
  deliveryFailed?(request: CommitmentRequest, error: string, attempt: number, retryInMs: number): void;
  /** The report could not be delivered before ReportExpiryHours: given up. */
  abandoned?(request: CommitmentRequest, error: string): void;
}

export interface StorageCommitmentDeps {
  tenant: TenantConfig;
  config: {
    modalities: readonly DicomModality[];
    dicom: Pick<DicomSettings, "strictAetComparison" | "maximumPduLength">;
    spool: Pick<SpoolSettings, "directory" | "verifyIntegrity">;
    storageCommitment: StorageCommitmentSettings;
    move: Pick<MoveSettings, "connectTimeoutMs">;
  };
  orthanc: OrthancApi;
  registry: Pick<UidRegistry, "holders">;
  forwarder: Pick<Forwarder, "watch">;
  spool: Pick<TenantSpool, "quarantineList">;
  events?: StorageCommitmentEvents;
  log?: Logger;
}

/** The N-ACTION's association, for a report sent on it. */
interface SameAssociation {
  send(command: CommandSet, dataset: Uint8Array): Promise<DimseResult>;
  transferSyntax: string;
  /** The gateway has the SCP role of Storage Commitment on it (PS3.7 D.3.3.4). */
  scp: boolean;
  respondedAt: number;
}

interface Task {
  controller: AbortController;
  same?: SameAssociation;
  done: Promise<void>;
}

/** A tenant's journal, shared by its SCPs while a reload's previous one drains. */
interface SharedJournal {
  journal: CommitmentJournal;
  /** SCPs using it: the last one to stop closes it. */
  users: number;
  /** Requests one of them is evaluating or reporting now (by journal id). */
  working: Set<string>;
}

/** Whether the acceptor plays the SCP of `sopClassUid` on this association: default roles, or the requestor's SCU role accepted. */
function acceptorIsScp(info: AssociationInfo, sopClassUid: string): boolean {
  const item = info.roleSelections.find((r) => r.sopClassUid === sopClassUid);
  return item === undefined || item.scu;
}

export class StorageCommitmentScp {
  private shared: SharedJournal | undefined;
  private readonly tasks = new Map<string, Task>();
  private stopping = false;
  /** The SCP a reload started for the tenant after this one: it takes over what this one leaves unfinished. */
  private successor: StorageCommitmentScp | undefined;
  private readonly log: Logger;
  readonly handler: DimseHandler;

  constructor(private readonly deps: StorageCommitmentDeps) {
    this.log = deps.log ?? silentLogger;
    this.handler = (request, responder) => this.onAction(request, responder);
  }

  private get journal(): CommitmentJournal | undefined {
    return this.shared?.journal;
  }

  /**
   * Opens the tenant's journal and resumes every request still owed a report (on a new association). With
   * `predecessor` (the tenant's SCP a reload replaces, still draining): shares its journal instead, and
   * resumes only the requests no SCP of the tenant is working on.
   */
  async start(predecessor?: StorageCommitmentScp): Promise<void> {
    const { config, tenant } = this.deps;
    let pending: CommitmentRequest[];
    if (predecessor?.shared) {
      this.shared = predecessor.shared;
      this.shared.users++;
      predecessor.successor = this;
      pending = this.shared.journal.pendingRequests().filter((r) => !this.shared!.working.has(r.id));
    } else {
      const journal = new CommitmentJournal(join(config.spool.directory, tenantDirectoryName(tenant.aet), "storage-commitment.jsonl"));
      pending = await journal.open();
      this.shared = { journal, users: 1, working: new Set() };
    }
    if (pending.length > 0) this.log.info("resuming Storage Commitment requests owed a report", { requests: pending.length });
    for (const r of pending) this.launch(r);
  }

  /**
   * Stops evaluating and reporting. What is owed stays in the journal: a successor still running takes it
   * over now, else the next start resumes it. The last SCP using the journal closes it.
   */
  async stop(): Promise<void> {
    this.stopping = true;
    for (const t of this.tasks.values()) t.controller.abort(new Error("the tenant is stopping"));
    await Promise.all([...this.tasks.values()].map((t) => t.done));
    const shared = this.shared;
    if (!shared) return;
    this.shared = undefined;
    const heir = this.heir();
    const handed = heir ? shared.journal.pendingRequests().filter((r) => !shared.working.has(r.id)) : [];
    if (handed.length > 0) this.log.info("Storage Commitment requests owed a report handed to the tenant's new listener", { requests: handed.length });
    for (const r of handed) heir!.launch(r);
    if (--shared.users === 0) await shared.journal.close();
  }

  /** The newest successor not stopping, if any. */
  private heir(): StorageCommitmentScp | undefined {
    let next = this.successor;
    while (next && (next.stopping || !next.shared)) next = next.successor;
    return next;
  }

  /** Requests acknowledged and not yet reported. */
  get pending(): number {
    return this.journal?.pendingCount ?? 0;
  }

  // ---- N-ACTION ----------------------------------------------------------------------------------

  private async onAction(request: DimseRequest, responder: DimseResponder): Promise<void> {
    const refuse = async (status: number, comment: string) => {
      await request.dataset?.readAll(MAX_ACTION_INFORMATION).catch(() => undefined);
      const c = errorComment(comment);
      await responder.respond({ status, errorComment: c });
      this.deps.events?.refused?.(status, c, responder.association);
    };
    const cmd = request.command;
    if (cmd.requestedSopInstanceUid !== STORAGE_COMMITMENT_INSTANCE) return refuse(Status.NoSuchSopInstance, `no such SOP instance: use ${STORAGE_COMMITMENT_INSTANCE}`);
    if (cmd.actionTypeId !== REQUEST_STORAGE_COMMITMENT) return refuse(Status.NoSuchActionType, `action type ${cmd.actionTypeId ?? "?"} unknown; 1 requests commitment`);
    const journal = this.journal;
    if (!journal || this.stopping) return refuse(Status.ProcessingFailure, "Storage Commitment is not available now: try again later");
    if (!request.dataset) return refuse(Status.MissingAttribute, "the request has no action information");
    let bytes: Uint8Array;
    try {
      bytes = await request.dataset.readAll(MAX_ACTION_INFORMATION);
    } catch (e) {
      return refuse(e instanceof RangeError ? Status.ResourceLimitation : Status.ProcessingFailure, e instanceof RangeError ? "action information larger than 4 MiB: split the request" : "the action information was not received");
    }
    let info: ReturnType<typeof readActionInformation>;
    try {
      info = readActionInformation(bytes, request.presentationContext.transferSyntax);
    } catch (e) {
      if (e instanceof ActionInformationError) return refuse(e.status, e.message);
      throw e;
    }
    const a = responder.association;
    responder.audit({ transactionUid: info.transactionUid, instances: info.references.length, sopInstanceUids: info.references.slice(0, 100).map((r) => r.sopInstanceUid).join("\\") });
    const same: SameAssociation = {
      send: (command, dataset) => responder.request(request.presentationContext.id, command, dataset),
      transferSyntax: request.presentationContext.transferSyntax,
      scp: acceptorIsScp(a, SopClass.StorageCommitmentPushModel),
      respondedAt: 0,
    };

    // The same request again (its response was lost): it is the pending one, reported once.
    const earlier = journal.pendingWith(info.transactionUid);
    if (earlier && aeTitlesEqual(earlier.callingAeTitle, a.callingAeTitle, this.deps.config.dicom.strictAetComparison) && sameReferences(earlier.references, info.references)) {
      responder.audit({ repeated: true });
      await responder.respond({ status: Status.Success });
      same.respondedAt = Date.now();
      const task = this.tasks.get(earlier.id);
      if (task && !task.same) task.same = same;
      this.deps.events?.requested?.(earlier, true);
      return;
    }

    const r: CommitmentRequest = {
      id: `${Date.now().toString(36)}-${crypto.randomUUID()}`,
      tenant: this.deps.tenant.aet,
      transactionUid: info.transactionUid,
      callingAeTitle: a.callingAeTitle,
      calledAeTitle: a.calledAeTitle,
      peer: `${a.peer.address}:${a.peer.port}`,
      receivedAt: new Date().toISOString(),
      waitUntil: Date.now() + this.deps.config.storageCommitment.waitMs,
      references: info.references,
      ...(journal.isUsed(info.transactionUid) ? { duplicate: true as const } : {}),
    };
    try {
      await journal.record(r);
    } catch (e) {
      this.log.error("cannot journal a Storage Commitment request: refused", { transactionUid: r.transactionUid, error: e instanceof Error ? e.message : String(e) });
      return refuse(Status.ProcessingFailure, "cannot record the request (spool disk): try again later");
    }
    if (r.duplicate) responder.audit({ duplicateTransactionUid: true });
    await responder.respond({ status: Status.Success });
    same.respondedAt = Date.now();
    this.deps.events?.requested?.(r, false);
    this.launch(r, same);
  }

  // ---- evaluation and report ------------------------------------------------------------------

  private launch(r: CommitmentRequest, same?: SameAssociation): void {
    const controller = new AbortController();
    const task: Task = { controller, same, done: Promise.resolve() };
    const working = this.shared?.working;
    this.tasks.set(r.id, task);
    working?.add(r.id);
    task.done = this.process(r, task)
      .catch((e) => {
        if (!controller.signal.aborted) this.log.error("Storage Commitment request failed unexpectedly; it is retried at the next start", { transactionUid: r.transactionUid, error: e instanceof Error ? e.message : String(e) });
      })
      .finally(() => {
        this.tasks.delete(r.id);
        working?.delete(r.id);
      });
  }

  private async process(r: CommitmentRequest, task: Task): Promise<void> {
    const signal = task.controller.signal;
    const notes = new Map<string, string>();
    const result = r.duplicate
      ? { committed: [], failed: r.references.map((ref) => ({ ...ref, reason: FailureReason.DuplicateTransactionUid })) }
      : await this.evaluate(r, notes, signal);
    if (r.duplicate) for (const ref of r.references) notes.set(ref.sopInstanceUid, `Transaction UID ${r.transactionUid} was already in use`);
    if (signal.aborted) return;
    this.deps.events?.evaluated?.(r, result, notes);
    await this.deliver(r, result, task);
  }

  /** Decides every referenced instance (see the file header); waits for those still on their way. */
  private async evaluate(r: CommitmentRequest, notes: Map<string, string>, signal: AbortSignal): Promise<CommitmentResult> {
    const tenant = this.deps.tenant.aet;
    const result: CommitmentResult = { committed: [], failed: [] };
    const fail = (ref: CommitmentReference, reason: FailureReasonCode, note: string) => {
      result.failed.push({ ...ref, reason });
      notes.set(ref.sopInstanceUid, note);
    };
    const waiting = new Map<string, CommitmentReference[]>();
    for (const ref of r.references) waiting.set(ref.sopInstanceUid, [...(waiting.get(ref.sopInstanceUid) ?? []), ref]);
    const quarantined = new Map<string, string>();
    for (const q of this.deps.spool.quarantineList()) quarantined.set(q.sopInstanceUid, q.reason);
    let wake: () => void = () => {};
    const unwatch = this.deps.forwarder.watch({
      forwarded: (t, entry) => {
        if (t.aet === tenant && waiting.has(entry.sopInstanceUid)) wake();
      },
      quarantined: (t, entry, reason) => {
        if (t.aet !== tenant || !waiting.has(entry.sopInstanceUid)) return;
        quarantined.set(entry.sopInstanceUid, reason);
        wake();
      },
    });
    const held = (uid: string) => this.deps.registry.holders("Instance", uid)?.has(tenant) === true;
    let orthancFailures = 0;
    try {
      for (;;) {
        // Who is on its way is noted before Orthanc is asked: an instance forwarded in between is then in Orthanc.
        const onItsWay = new Set([...waiting.keys()].filter(held));
        let lastError: string | undefined;
        try {
          const found = await this.lookup([...waiting.keys()], signal);
          for (const [uid, refs] of waiting) {
            const instance = found.get(uid);
            if (instance) {
              for (const ref of refs) {
                const why = await this.check(ref, instance, signal);
                if (why) fail(ref, why.reason, why.note);
                else result.committed.push(ref);
              }
              waiting.delete(uid);
            } else if (quarantined.has(uid)) {
              for (const ref of refs) fail(ref, FailureReason.ProcessingFailure, `quarantined, never stored in Orthanc: ${quarantined.get(uid)}`);
              waiting.delete(uid);
            } else if (!onItsWay.has(uid) && !held(uid)) {
              for (const ref of refs) fail(ref, FailureReason.NoSuchObjectInstance, "not in Orthanc within the tenant's scope");
              waiting.delete(uid);
            }
          }
          orthancFailures = 0;
        } catch (e) {
          if (signal.aborted) throw e;
          orthancFailures++;
          lastError = e instanceof Error ? e.message : String(e);
          this.log.warn("Storage Commitment: cannot check the instances in Orthanc now, will retry", { transactionUid: r.transactionUid, error: lastError });
        }
        if (waiting.size === 0) break;
        const now = Date.now();
        if (now >= r.waitUntil) {
          const why = lastError ? `Orthanc could not be asked in time: ${lastError}` : `still on its way to Orthanc after ${Math.round(this.deps.config.storageCommitment.waitMs / 1000)} s (Gateway.StorageCommitment.WaitSeconds)`;
          for (const refs of waiting.values()) for (const ref of refs) fail(ref, FailureReason.ProcessingFailure, why);
          break;
        }
        const pause = orthancFailures > 0 ? Math.min(RECHECK_MS * orthancFailures, 60_000) : RECHECK_MS;
        await sleep(Math.min(pause, r.waitUntil - now), signal, (w) => (wake = w));
        if (signal.aborted) throw signal.reason;
      }
    } finally {
      unwatch();
    }
    return result;
  }

  /** The referenced instances Orthanc holds within the tenant's scope, by SOP Instance UID. */
  private async lookup(uids: string[], signal: AbortSignal): Promise<Map<string, ResolvedInstance>> {
    const scope = tenantLabelScope(this.deps.tenant);
    const found = new Map<string, ResolvedInstance>();
    // One Orthanc node for the look-up's pages (another one if it fails: nodes.ts), as C-FIND and C-MOVE do.
    const orthanc = pinned(this.deps.orthanc);
    for (let i = 0; i < uids.length; i += LOOKUP_BATCH) {
      const batch = await resolveInstances(orthanc, scope, { level: "IMAGE", sopInstanceUids: uids.slice(i, i + LOOKUP_BATCH) }, { signal });
      for (const inst of batch) found.set(inst.sopInstanceUid, inst);
    }
    return found;
  }

  /** Why an instance Orthanc holds cannot be committed, if so: another SOP class, or (VerifyIntegrity) a corrupted file. */
  private async check(ref: CommitmentReference, instance: ResolvedInstance, signal: AbortSignal): Promise<{ reason: FailureReasonCode; note: string } | undefined> {
    if (instance.sopClassUid !== ref.sopClassUid) return { reason: FailureReason.ClassInstanceConflict, note: `Orthanc holds it as SOP class ${instance.sopClassUid}, the request names ${ref.sopClassUid}` };
    if (!this.deps.config.spool.verifyIntegrity) return undefined;
    try {
      // Orthanc reads the stored file again and compares it with the MD5 it recorded when storing it.
      await this.deps.orthanc.postJson(`/instances/${encodeURIComponent(instance.id)}/attachments/dicom/verify-md5`, {}, { signal });
      return undefined;
    } catch (e) {
      if (e instanceof OrthancError && e.kind === "http") return { reason: FailureReason.ProcessingFailure, note: `Orthanc's integrity check of its stored file failed: ${e.message}` };
      throw e;
    }
  }

  private async deliver(r: CommitmentRequest, result: CommitmentResult, task: Task): Promise<void> {
    const signal = task.controller.signal;
    const report: ReportIn = (transferSyntax) => {
      const info = encodeEventInformation(r.transactionUid, result, this.deps.tenant.aet, transferSyntax);
      const command = nEventReportRQ({ affectedSopClassUid: SopClass.StorageCommitmentPushModel, affectedSopInstanceUid: STORAGE_COMMITMENT_INSTANCE, eventTypeId: info.eventTypeId });
      return { command, dataset: info.dataset };
    };
    const same = task.same;
    if (same?.scp) {
      const wait = same.respondedAt + SAME_ASSOCIATION_GRACE_MS - Date.now();
      if (wait > 0) await sleep(wait, signal);
      if (signal.aborted) return;
      const { command, dataset } = report(same.transferSyntax);
      const sent = await same.send(command, dataset).then(
        (rsp) => rsp,
        () => undefined, // the requester released (or lost) the association: a new one
      );
      if (sent) return this.finish(r, result, "same-association", sent.command.status ?? Status.Success, 1);
    }
    for (let attempt = 1; ; attempt++) {
      if (signal.aborted) return;
      try {
        const status = await this.reportOnNewAssociation(r, report, signal);
        return await this.finish(r, result, "new-association", status, attempt);
      } catch (e) {
        if (signal.aborted) return;
        const error = e instanceof Error ? e.message : String(e);
        const expiry = this.deps.config.storageCommitment.reportExpiryMs;
        if (expiry > 0 && Date.now() - Date.parse(r.receivedAt) >= expiry) {
          await this.journal?.done(r, "abandoned").catch(() => {});
          this.deps.events?.abandoned?.(r, error);
          return;
        }
        const delay = backoffDelay(attempt, RETRY_BASE_MS, RETRY_MAX_MS);
        this.deps.events?.deliveryFailed?.(r, error, attempt, delay);
        await sleep(delay, signal);
      }
    }
  }

  /** The report on a new association to the requester's AE title (DicomModalities); resolves with the N-EVENT-REPORT-RSP status. */
  private async reportOnNewAssociation(r: CommitmentRequest, report: ReportIn, signal: AbortSignal): Promise<number> {
    const modality = this.modalityOf(r);
    if (!modality) throw new Error(`the requester's AE title ${r.callingAeTitle} is not in DicomModalities: add it (AET, host, port) so that the report can reach it`);
    // A stop cancels the association until the report is on the wire. Once it is, the response (and the
    // release) is awaited for at most REPORT_STOP_GRACE_MS, so that a report the requester has received is
    // journaled as reported and not sent once more after the restart.
    const wire = new AbortController();
    let onWire = false;
    let grace: ReturnType<typeof setTimeout> | undefined;
    const onStop = () => {
      if (onWire) grace = setTimeout(() => wire.abort(signal.reason), REPORT_STOP_GRACE_MS);
      else wire.abort(signal.reason);
    };
    if (signal.aborted) onStop();
    else signal.addEventListener("abort", onStop, { once: true });
    try {
      return await this.reportOn(modality, r, report, wire.signal, () => (onWire = true));
    } finally {
      signal.removeEventListener("abort", onStop);
      clearTimeout(grace);
    }
  }

  private async reportOn(modality: DicomModality, r: CommitmentRequest, report: ReportIn, signal: AbortSignal, sending: () => void): Promise<number> {
    const sc = SopClass.StorageCommitmentPushModel;
    const a = await RequestorAssociation.connect({
      host: modality.host,
      port: modality.port,
      calledAeTitle: modality.aet,
      callingAeTitle: r.calledAeTitle,
      presentationContexts: [{ abstractSyntax: sc, transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian, TransferSyntax.ImplicitVRLittleEndian] }],
      roleSelections: [{ sopClassUid: sc, scu: false, scp: true }],
      maxPduLength: this.deps.config.dicom.maximumPduLength,
      connectTimeoutMs: this.deps.config.move.connectTimeoutMs,
      signal,
    });
    try {
      const pc = a.findContext(sc);
      if (!pc) throw new Error(`${modality.aet} at ${modality.host}:${modality.port} refused the Storage Commitment presentation context`);
      const role = a.roleSelections.find((x) => x.sopClassUid === sc);
      if (role && !role.scp) throw new Error(`${modality.aet} refused the SCP role of Storage Commitment for the gateway (PS3.4 J.3.3.1.2): it cannot receive the report on a new association`);
      const { command, dataset } = report(pc.transferSyntax);
      sending();
      const rsp = await a.request(pc.id, command, dataset);
      return rsp.status ?? Status.Success;
    } finally {
      await a.release();
    }
  }

  /** The DicomModalities entry of the requester: its AE title, the one at the requester's address first. */
  private modalityOf(r: CommitmentRequest): DicomModality | undefined {
    const candidates = this.deps.config.modalities.filter((m) => aeTitlesEqual(m.aet, r.callingAeTitle, this.deps.config.dicom.strictAetComparison));
    const address = r.peer.slice(0, r.peer.lastIndexOf(":")).replace(/^::ffff:/, "");
    return candidates.find((m) => m.host === address) ?? candidates[0];
  }

  private async finish(r: CommitmentRequest, result: CommitmentResult, path: ReportPath, status: number, attempts: number): Promise<void> {
    try {
      await this.journal?.done(r, "reported");
    } catch (e) {
      // The report went out; if the line is lost, it goes out again after a restart (the SCU may see it twice).
      this.log.error("cannot journal a delivered Storage Commitment report", { transactionUid: r.transactionUid, error: e instanceof Error ? e.message : String(e) });
    }
    this.deps.events?.reported?.(r, result, path, status, attempts);
  }
}

function sameReferences(a: readonly CommitmentReference[], b: readonly CommitmentReference[]): boolean {
  return a.length === b.length && a.every((x, i) => x.sopInstanceUid === b[i]!.sopInstanceUid && x.sopClassUid === b[i]!.sopClassUid);
}

/** Resolves after `ms`, at an abort of `signal`, or when the function handed to `onWake` is called. */
function sleep(ms: number, signal: AbortSignal, onWake?: (wake: () => void) => void): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal.removeEventListener("abort", done);
      resolve();
    }
    onWake?.(done);
    signal.addEventListener("abort", done, { once: true });
  });
}
