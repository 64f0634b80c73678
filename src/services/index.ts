/**
 * The DIMSE services a tenant listener offers: which abstract syntaxes it negotiates (with which
 * transfer syntaxes) and which handler answers each request command. Each service lives in its own
 * file of services/; this is the one place that puts them together.
 */
import type { GatewayConfig, TenantConfig } from "../config/types.ts";
import type { DimseHandler } from "../net/association.ts";
import { CommandField } from "../net/constants.ts";
import { handleEcho } from "./echo.ts";
import { UNCOMPRESSED_LITTLE_ENDIAN, type SupportedSyntaxes, type TransferSyntaxPolicy } from "../net/negotiation.ts";
import { createStoreHandler, type StoreEvents } from "./store.ts";
import { createFindHandler, FIND_ABSTRACT_SYNTAXES } from "./find.ts";
import { createGetHandler } from "./get.ts";
import { createMoveHandler } from "./move.ts";
import { createRetrieveMetrics } from "./retrieve-metrics.ts";
import { scopeWatch } from "./scope-watch.ts";
import { StorageCommitmentScp, type StorageCommitmentEvents } from "./storage-commitment.ts";
import { DICOM_UID_ROOT, isStandardStorageSopClass, queryRetrieveSopClasses, SopClass } from "../dicom/sop-classes.ts";
import { transferSyntaxMatcher } from "../dicom/uids.ts";
import type { Logger } from "../shared/log.ts";
import type { GatewayMetrics } from "../observe/metrics.ts";
import type { Labeler } from "../orthanc/labeler.ts";
import type { OrthancApi } from "../orthanc/nodes.ts";
import type { Forwarder } from "../spool/forwarder.ts";
import type { TenantSpool } from "../spool/spool.ts";
import type { IsolationGuard } from "../tenancy/isolation.ts";
import type { UidRegistry } from "../tenancy/ownership.ts";

/** Everything a tenant's services may need. */
export interface TenantContext {
  tenant: TenantConfig;
  config: GatewayConfig;
  orthanc: OrthancApi;
  labeler: Labeler;
  forwarder: Forwarder;
  spool: TenantSpool;
  metrics: GatewayMetrics;
  storeEvents?: StoreEvents;
  storageCommitmentEvents?: StorageCommitmentEvents;
  /** The tenant's isolation guard when its Isolation is Strict. */
  guard?: IsolationGuard;
  /** Where instances hold their UIDs between their check and Orthanc (every tenant). */
  registry: UidRegistry;
  log: Logger;
}

export interface TenantServices {
  syntaxes: SupportedSyntaxes;
  handlers: Map<number, DimseHandler>;
  /**
   * Work of the services that outlives an association (Storage Commitment reports, owed across restarts):
   * started before the tenant listens, stopped after its listener closed.
   */
  background: TenantBackground;
}

/** The services' work that outlives associations, started and stopped with a tenant's listener. */
export interface TenantBackground {
  /**
   * Starts it. `predecessor`: the background of the same tenant's listener that a reload replaces (still
   * draining): its Storage Commitment journal is shared rather than opened again, what it is working on
   * stays its own, and what it has not finished when it stops comes here.
   */
  start(predecessor?: TenantBackground): Promise<void>;
  /** Stops it; what is still owed stays in the journal (for the successor, or the next start). */
  stop(): Promise<void>;
}

/** The background of createTenantServices: Storage Commitment's reports. */
class CommitmentBackground implements TenantBackground {
  constructor(readonly commitment: StorageCommitmentScp) {}
  start(predecessor?: TenantBackground): Promise<void> {
    return this.commitment.start(predecessor instanceof CommitmentBackground ? predecessor.commitment : undefined);
  }
  stop(): Promise<void> {
    return this.commitment.stop();
  }
}

export function createTenantServices(ctx: TenantContext): TenantServices {
  const abstractSyntaxes = new Map<string, TransferSyntaxPolicy>([[SopClass.Verification, UNCOMPRESSED_LITTLE_ENDIAN]]);
  const handlers = new Map<number, DimseHandler>([[CommandField.CEchoRQ, handleEcho]]);

  // Storage (C-STORE SCP): every standard storage SOP class, and unknown ones when UnknownSopClassAccepted,
  // in whatever accepted transfer syntax the modality proposes first (no transcoding).
  const storagePolicy: TransferSyntaxPolicy = { accept: transferSyntaxMatcher(ctx.config.store.acceptedTransferSyntaxes) };
  // "Unknown" means private: a UID outside the DICOM root (standard classes there are either storage or not storage).
  const isStorage = (uid: string) =>
    isStandardStorageSopClass(uid) || (ctx.config.store.unknownSopClassAccepted && !uid.startsWith(DICOM_UID_ROOT) && !abstractSyntaxes.has(uid));
  handlers.set(
    CommandField.CStoreRQ,
    createStoreHandler({ tenant: ctx.tenant, spool: ctx.spool, orthanc: ctx.orthanc, labeler: ctx.labeler, forwarder: ctx.forwarder, registry: ctx.registry, guard: ctx.guard, defaultEncoding: ctx.config.dicom.defaultEncoding, events: ctx.storeEvents }),
  );

  // Query (C-FIND SCP): Patient Root, Study Root and Patient/Study Only, within the tenant's labels.
  for (const uid of FIND_ABSTRACT_SYNTAXES) abstractSyntaxes.set(uid, UNCOMPRESSED_LITTLE_ENDIAN);
  handlers.set(
    CommandField.CFindRQ,
    createFindHandler({
      tenant: ctx.tenant,
      orthanc: ctx.orthanc,
      find: ctx.config.find,
      defaultEncoding: ctx.config.dicom.defaultEncoding,
      log: ctx.log,
      outOfScope: scopeWatch(ctx.metrics.registry, ctx.log, ctx.tenant.aet, "C-FIND"),
    }),
  );

  // Retrieve (C-MOVE and C-GET SCP), Patient Root and Study Root. C-GET's C-STORE sub-operations use
  // the storage contexts the requester proposed with the SCP role, which is accepted for storage classes.
  const retrieve = { tenant: ctx.tenant, config: ctx.config, orthanc: ctx.orthanc, metrics: createRetrieveMetrics(ctx.metrics.registry), log: ctx.log };
  for (const uid of [...queryRetrieveSopClasses("MOVE"), ...queryRetrieveSopClasses("GET")]) abstractSyntaxes.set(uid, UNCOMPRESSED_LITTLE_ENDIAN);
  handlers.set(CommandField.CMoveRQ, createMoveHandler({ ...retrieve, outOfScope: scopeWatch(ctx.metrics.registry, ctx.log, ctx.tenant.aet, "C-MOVE") }));
  handlers.set(CommandField.CGetRQ, createGetHandler({ ...retrieve, outOfScope: scopeWatch(ctx.metrics.registry, ctx.log, ctx.tenant.aet, "C-GET") }));

  // Storage Commitment Push Model SCP (PS3.4 Annex J): N-ACTION answered at once, N-EVENT-REPORT when
  // the instances are decided, on the same association or a new one (storage-commitment.ts).
  const commitment = new StorageCommitmentScp({
    tenant: ctx.tenant,
    config: ctx.config,
    orthanc: ctx.orthanc,
    registry: ctx.registry,
    forwarder: ctx.forwarder,
    spool: ctx.spool,
    events: ctx.storageCommitmentEvents,
    log: ctx.log,
  });
  abstractSyntaxes.set(SopClass.StorageCommitmentPushModel, UNCOMPRESSED_LITTLE_ENDIAN);
  handlers.set(CommandField.NActionRQ, commitment.handler);

  return {
    background: new CommitmentBackground(commitment),
    syntaxes: {
      abstractSyntaxes,
      fallback: (uid) => (isStorage(uid) ? storagePolicy : undefined),
      acceptScpRoleFor: isStorage,
      // C-FIND extended negotiation (PS3.4 C.3.1): combined date-time matching is supported, relational
      // queries, fuzzy person-name matching and timezone adjustment are not (answered 0).
      extendedNegotiation: (uid, requested) => (FIND_ABSTRACT_SYNTAXES.includes(uid) ? Uint8Array.of(0, requested[1] === 1 ? 1 : 0) : undefined),
    },
    handlers,
  };
}
