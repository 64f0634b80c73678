/**
 * The gateway's shared state: what startGateway (lifecycle.ts) creates once and the other files of
 * gateway/ read — and, for the running tenants and their spools, update. One typed object handed to plain
 * functions instead of the variables of one closure, so that each concern lives in a file of its own:
 * lifecycle.ts (start, stop), tenants.ts (one tenant's spool, guard, services, policy, listener),
 * reload.ts (a new configuration's tenants), snapshot.ts (/status), observers.ts (events → logs, metrics, audit).
 */
import type { GatewayConfig, TenantConfig } from "../config/types.ts";
import type { ConnectionLimits } from "../net/admission.ts";
import type { DimseServer } from "../net/server.ts";
import type { ChangesFeed } from "../orthanc/changes.ts";
import type { ClusterMonitor } from "../orthanc/cluster-monitor.ts";
import type { Labeler } from "../orthanc/labeler.ts";
import type { OrthancNodes } from "../orthanc/nodes.ts";
import type { SpoolFiles } from "../spool/files.ts";
import type { LastReload } from "../observe/status.ts";
import type { TenantBackground } from "../services/index.ts";
import type { Forwarder } from "../spool/forwarder.ts";
import type { SegmentPool } from "../spool/pool.ts";
import type { TenantSpool } from "../spool/spool.ts";
import type { AssociationPolicy } from "../tenancy/association-policy.ts";
import type { IsolationGuards } from "../tenancy/isolation.ts";
import type { OwnerRecords } from "../tenancy/owner-records.ts";
import type { UidRegistry } from "../tenancy/ownership.ts";
import type { GatewaySinks } from "./observers.ts";

/** One running tenant: its configuration, its listener(s) and the spool it stores into. */
export interface TenantListener {
  tenant: TenantConfig;
  server: DimseServer;
  spool: TenantSpool;
  policy: AssociationPolicy;
  /**
   * The services' work that outlives associations (Storage Commitment reports): started before the listener
   * listens, stopped after it closed — after its drain, when a reload replaced it.
   */
  background: TenantBackground;
  /** The last forwarding error of this tenant, cleared by the next success. */
  lastForwardError?: string;
}

export interface GatewayState extends GatewaySinks {
  /**
   * The running configuration; the same object as `Gateway.config` and the services' `config`: a reload
   * replaces its `tenants`, `modalities`, `log.level` and `limits.drainMs` in place (C-MOVE reads the
   * destinations from it).
   */
  readonly config: GatewayConfig;
  readonly startedAt: string;
  /** The Orthanc node(s) of `Gateway.Orthanc.Url`, with failover. */
  readonly orthanc: OrthancNodes;
  /** Every node's health. */
  readonly monitor: ClusterMonitor;
  /** Orthanc's change log: keeps the label and ownership caches in step with Orthanc. */
  readonly changes: ChangesFeed;
  readonly labeler: Labeler;
  /** Strict isolation: the UIDs in flight on this gateway, and the legacy claims until they are migrated. */
  readonly registry: UidRegistry;
  /** Strict isolation: the ownership records in Orthanc, shared by every gateway of the site. */
  readonly records: OwnerRecords;
  /** One isolation guard per Strict tenant, by AE title. */
  readonly guards: IsolationGuards;
  readonly forwarder: Forwarder;
  /**
   * The gateway-wide connection limits, shared by every listener: accepted associations
   * (`Gateway.Limits.MaxAssociations`), connections not yet associated (in total, per peer address) and the
   * process's file descriptors.
   */
  readonly limits: ConnectionLimits;
  readonly artimTimeoutMs: number;
  /** The spool's file layer (undefined: node:fs). */
  readonly spoolFiles?: SpoolFiles;
  /** The running tenants in configuration order (the array `Gateway.listeners` is). */
  readonly listeners: TenantListener[];
  /** The running tenants by AE title as configured, for the forwarder's events. */
  readonly byTenant: Map<string, TenantListener>;
  /**
   * One spool per tenant directory for the gateway's lifetime: a reload that stops and starts a tenant
   * again keeps it (the forwarder still holds its entries, and its segments stay open).
   */
  readonly spools: Map<string, TenantSpool>;
  /** The reload in progress (settled), so that reloads apply one after another. */
  reloading: Promise<unknown>;
  /** The outcome of the last reload, for /status. */
  lastReload?: LastReload;
  /** Listeners a reload replaced or removed, while their open associations finish (stop cuts them short at its own drain time). */
  readonly draining: Map<TenantListener, Promise<void>>;
  /** The ready segments all tenants' spools take their writers from. */
  readonly pool: SegmentPool;
}
