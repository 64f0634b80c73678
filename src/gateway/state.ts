/**
 * The gateway's shared state: what startGateway (lifecycle.ts) creates once and the other files of
 * gateway/ read — and, for the running tenants and their spools, update. One typed object handed to plain
 * functions instead of the variables of one closure, so that each concern lives in a file of its own:
 * lifecycle.ts (start, stop), tenants.ts (one tenant's spool, guard, services, policy, listener),
 * reload.ts (a new configuration's tenants), snapshot.ts (/status), observers.ts (events → logs, metrics, audit).
 */
import type { GatewayConfig, TenantConfig } from "../config/types.ts";
import type { AssociationCounter, DimseServer } from "../net/server.ts";
import type { ChangesFeed } from "../orthanc/changes.ts";
import type { OrthancClient } from "../orthanc/client.ts";
import type { OrthancMonitor } from "../orthanc/monitor.ts";
import type { Labeler } from "../orthanc/labeler.ts";
import type { SpoolFiles } from "../spool/files.ts";
import type { Forwarder } from "../spool/forwarder.ts";
import type { TenantSpool } from "../spool/spool.ts";
import type { AssociationPolicy } from "../tenancy/association-policy.ts";
import type { IsolationGuards } from "../tenancy/isolation.ts";
import type { UidRegistry } from "../tenancy/ownership.ts";
import type { GatewaySinks } from "./observers.ts";

/** One running tenant: its configuration, its listener(s) and the spool it stores into. */
export interface TenantListener {
  tenant: TenantConfig;
  server: DimseServer;
  spool: TenantSpool;
  policy: AssociationPolicy;
  /** The last forwarding error of this tenant, cleared by the next success. */
  lastForwardError?: string;
}

export interface GatewayState extends GatewaySinks {
  /**
   * The running configuration; the same object as `Gateway.config` and the services' `config`: a reload
   * replaces its `tenants` and `modalities` in place (C-MOVE reads the destinations from it).
   */
  readonly config: GatewayConfig;
  readonly startedAt: string;
  readonly orthanc: OrthancClient;
  readonly monitor: OrthancMonitor;
  /** Orthanc's change log: keeps the label and ownership caches in step with Orthanc. */
  readonly changes: ChangesFeed;
  readonly labeler: Labeler;
  /** Strict isolation: which UIDs were created by which tenant or are in flight. */
  readonly registry: UidRegistry;
  /** One isolation guard per Strict tenant, by AE title. */
  readonly guards: IsolationGuards;
  readonly forwarder: Forwarder;
  /** The gateway-wide association limit (`Gateway.Limits.MaxAssociations`), shared by every listener. */
  readonly globalLimit: AssociationCounter;
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
}
