/**
 * What Strict isolation does after an instance's upload and before it counts as delivered, the same for the
 * spool's forwarder and for Sync-mode C-STORE: Orthanc must have filed it where the gateway checked; a SOP
 * Instance UID that was new when checked but that Orthanc already holds must hold exactly these bytes; the
 * study and series are claimed in Orthanc's ownership records (IsolationGuard.settle) — and only then are
 * the labels put (one round trip, store.ts labelPlanned). A refusal never leaves this tenant's label behind,
 * and undoes the upload only if it created the instance. The callers report a refusal in their own way
 * (quarantine, or a C-STORE status).
 */
import type { ResourceLevel } from "../config/types.ts";
import type { InstanceIdentity } from "../dicom/dataset-reader.ts";
import type { LabelPlan, Labeler } from "../orthanc/labeler.ts";
import type { OrthancApi } from "../orthanc/nodes.ts";
import { labelPlanned, placementMismatch, storedAttachmentInfo, type LabeledUpload } from "../orthanc/store.ts";
import type { IsolationGuard } from "./isolation.ts";

/** The bytes' size and MD5 (hex). */
export interface ContentDigest {
  size: number;
  md5: string;
}

export type StrictSettlement =
  /** Claimed and labeled (`labeled`: every label of the plan landed). */
  | { ok: true; labeled: boolean }
  /** Orthanc filed it elsewhere than checked (`reason` says where). */
  | { ok: false; kind: "placement"; reason: string; deleted: boolean }
  /** Orthanc already holds other bytes under its SOP Instance UID, stored by another writer since the check. */
  | { ok: false; kind: "replay"; held: ContentDigest }
  /** Another tenant claimed the study or series first. */
  | { ok: false; kind: "claim"; level: ResourceLevel; reason: string; deleted: boolean };

export async function settleStrictUpload(o: {
  orthanc: OrthancApi;
  guard: IsolationGuard;
  labeler: Labeler;
  identity: InstanceIdentity;
  plan: LabelPlan;
  /** The upload, made with `labelsLater` (and the guard's recordReads across a link). */
  up: LabeledUpload;
  /** No instance had its SOP Instance UID when it was checked. */
  instanceIsNew: boolean;
  /** What was sent, for comparison with what Orthanc holds. */
  sent: () => Promise<ContentDigest>;
}): Promise<StrictSettlement> {
  const { orthanc, up } = o;
  const stored = up.stored;
  // Never delete what this upload did not create: only a new instance that was not in Orthanc before.
  const undo = async () => {
    const deleted = stored.status === "Success" && o.instanceIsNew;
    if (deleted) await orthanc.delete(`/instances/${stored.id}`);
    return deleted;
  };
  const misplaced = placementMismatch(stored, o.plan.ids);
  if (misplaced) return { ok: false, kind: "placement", reason: misplaced, deleted: await undo() };
  // Another writer (another gateway's tenant) stored this SOP Instance UID since the check: labeled only if
  // Orthanc holds exactly these bytes (a replay of this very upload), never another tenant's content.
  if (stored.status === "AlreadyStored" && o.instanceIsNew) {
    const held = up.attachment ?? (await storedAttachmentInfo(orthanc, stored.id));
    const sent = await o.sent();
    if (held.md5 !== sent.md5 || held.size !== sent.size) return { ok: false, kind: "replay", held };
  }
  // Claimed in Orthanc, where every gateway sees it, before any label; a tenant that claimed first keeps it.
  const settled = await o.guard.settle(o.identity, stored, undefined, up.reads);
  if (!settled.ok) return { ok: false, kind: "claim", level: settled.level, reason: settled.reason, deleted: await undo() };
  return { ok: true, labeled: await labelPlanned(orthanc, o.labeler, o.plan, stored.at ?? performance.now()) };
}
