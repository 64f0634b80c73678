/**
 * What an operator can see and do in the spool (`dicom-gateway spool …`, through the running gateway's
 * /spool API or, when no gateway runs, on the files under the spool's lock): list the instances waiting
 * for Orthanc and those in quarantine, show one, export its Part 10 file, put a quarantined instance back
 * into the queue once its cause is fixed (retry), or drop it for good (release, purge). Every retry and
 * release is audited ("instance-retried", "instance-released") with who asked for it.
 *
 * An instance is named by its spool id (as `list` shows it) or by its SOP Instance UID when that names
 * one instance only.
 */
import { createReadStream } from "node:fs";
import { Readable } from "node:stream";
import type { TenantConfig } from "../config/types.ts";
import type { AuditLog } from "../observe/audit.ts";
import type { SpoolEntry, SpoolRecord } from "./record.ts";
import type { TenantSpool } from "./spool.ts";

/** One tenant's spool as the admin sees it; `config` is undefined for a tenant no longer configured. */
export interface AdminTenant {
  aet: string;
  spool: TenantSpool;
  config?: TenantConfig;
}

export type InstanceState = "pending" | "quarantined";

/** An instance of the spool, as `spool list` and `spool show` tell it. */
export interface SpoolInstance {
  tenant: string;
  state: InstanceState;
  /** The spool id: what the other commands take. */
  id: string;
  sopInstanceUid: string;
  sopClassUid: string;
  transferSyntaxUid: string;
  studyInstanceUid?: string;
  seriesInstanceUid?: string;
  patientId?: string;
  callingAeTitle: string;
  peer: string;
  receivedAt: string;
  ageSeconds: number;
  /** Bytes of the Part 10 file. */
  size: number;
  /** Quarantined: why, and since when. */
  reason?: string;
  quarantinedAt?: string;
}

/** A request the admin cannot carry out; `status` is the HTTP status the API answers it with. */
export class SpoolAdminError extends Error {
  override name = "SpoolAdminError";
  constructor(
    message: string,
    readonly status: 400 | 404 | 409,
  ) {
    super(message);
  }
}

export interface SpoolAdminOptions {
  tenants: () => AdminTenant[];
  audit: AuditLog;
  /** A quarantined instance was put back into the queue (the running gateway queues it for the forwarder). */
  requeued?: (tenant: AdminTenant, entry: SpoolEntry) => void;
  now?: () => number;
}

export class SpoolAdmin {
  constructor(private readonly opts: SpoolAdminOptions) {}

  /** Pending and quarantined instances, per tenant in configuration order, oldest first. */
  list(filter: { tenant?: string; state?: InstanceState } = {}): SpoolInstance[] {
    const out: SpoolInstance[] = [];
    for (const t of this.tenantsMatching(filter.tenant)) {
      if (filter.state !== "quarantined") for (const e of t.spool.pendingEntries()) out.push(this.describe(t, "pending", e));
      if (filter.state !== "pending") for (const q of t.spool.quarantineList()) out.push(this.describe(t, "quarantined", q, q));
    }
    return out;
  }

  /** One instance, by spool id or SOP Instance UID. */
  show(ref: string): SpoolInstance {
    return this.find(ref).instance;
  }

  /** An instance's Part 10 file, as a stream of its bytes. */
  export(ref: string): { instance: SpoolInstance; body: ReadableStream<Uint8Array> } {
    const { tenant, instance, entry } = this.find(ref);
    const stream =
      instance.state === "quarantined"
        ? createReadStream(tenant.spool.quarantinedFile(instance.id))
        : createReadStream(entry!.file, { start: entry!.offset, end: entry!.offset + entry!.size - 1 });
    return { instance, body: Readable.toWeb(stream) as unknown as ReadableStream<Uint8Array> };
  }

  /** Puts a quarantined instance back into the queue; it gets a new spool id (it is forwarded after what waits already). */
  async retry(ref: string, by: string): Promise<SpoolInstance> {
    const { tenant, instance } = this.find(ref, "quarantined");
    if (!tenant.config) {
      throw new SpoolAdminError(`tenant ${tenant.aet} is not in the configuration: its instances are not forwarded; add it back (and reload), or release the instance`, 409);
    }
    const entry = await tenant.spool.requeue(instance.id);
    if (!entry) throw new SpoolAdminError(`no quarantined instance ${instance.id} in tenant ${tenant.aet} (released meanwhile?)`, 404);
    this.opts.requeued?.(tenant, entry);
    this.opts.audit.instance({ event: "instance-retried", tenant: tenant.aet, callingAe: instance.callingAeTitle, peer: instance.peer, sopInstanceUid: instance.sopInstanceUid, studyInstanceUid: instance.studyInstanceUid, outcome: "queued", reason: `retried by ${by}; was quarantined: ${instance.reason}`, quarantinedId: instance.id, id: entry.id, by });
    return this.describe(tenant, "pending", entry);
  }

  /** Drops a quarantined instance for good. */
  async release(ref: string, by: string, why?: string): Promise<SpoolInstance> {
    const { tenant, instance } = this.find(ref, "quarantined");
    return this.releaseOne(tenant, instance, by, why);
  }

  /** Drops the quarantined instances of a tenant (or all), optionally only those quarantined more than `olderThanDays` ago. */
  async purge(filter: { tenant?: string; olderThanDays?: number }, by: string, why?: string): Promise<SpoolInstance[]> {
    const now = (this.opts.now ?? Date.now)();
    const released: SpoolInstance[] = [];
    for (const t of this.tenantsMatching(filter.tenant)) {
      for (const q of [...t.spool.quarantineList()]) {
        if (filter.olderThanDays !== undefined && now - Date.parse(q.quarantinedAt) < filter.olderThanDays * 86_400_000) continue;
        released.push(await this.releaseOne(t, this.describe(t, "quarantined", q, q), by, why));
      }
    }
    return released;
  }

  private async releaseOne(tenant: AdminTenant, instance: SpoolInstance, by: string, why?: string): Promise<SpoolInstance> {
    if (!(await tenant.spool.release(instance.id))) throw new SpoolAdminError(`no quarantined instance ${instance.id} in tenant ${tenant.aet} (released meanwhile?)`, 404);
    this.opts.audit.instance({ event: "instance-released", tenant: tenant.aet, callingAe: instance.callingAeTitle, peer: instance.peer, sopInstanceUid: instance.sopInstanceUid, studyInstanceUid: instance.studyInstanceUid, outcome: "released", reason: `released by ${by}${why ? `: ${why}` : ""}; was quarantined: ${instance.reason}`, id: instance.id, by });
    return instance;
  }

  private tenantsMatching(aet: string | undefined): AdminTenant[] {
    const all = this.opts.tenants();
    if (aet === undefined) return all;
    const t = all.filter((x) => x.aet === aet || x.aet.toUpperCase() === aet.toUpperCase());
    const exact = t.filter((x) => x.aet === aet);
    if (exact.length === 1 || t.length === 1) return exact.length === 1 ? exact : t;
    if (t.length === 0) throw new SpoolAdminError(`no tenant ${aet} in the spool (tenants: ${all.map((x) => x.aet).join(", ") || "none"})`, 404);
    throw new SpoolAdminError(`tenant ${aet} is ambiguous (${t.map((x) => x.aet).join(", ")}): give its AE title exactly`, 400);
  }

  private find(ref: string, state?: InstanceState): { tenant: AdminTenant; instance: SpoolInstance; entry?: SpoolEntry } {
    const hits: { tenant: AdminTenant; instance: SpoolInstance; entry?: SpoolEntry }[] = [];
    for (const t of this.opts.tenants()) {
      for (const e of t.spool.pendingEntries()) if (e.id === ref || e.sopInstanceUid === ref) hits.push({ tenant: t, instance: this.describe(t, "pending", e), entry: e });
      for (const q of t.spool.quarantineList()) if (q.id === ref || q.sopInstanceUid === ref) hits.push({ tenant: t, instance: this.describe(t, "quarantined", q, q) });
    }
    const byId = hits.filter((h) => h.instance.id === ref);
    const chosen = byId.length > 0 ? byId : hits;
    if (chosen.length === 0) throw new SpoolAdminError(`no instance ${ref} in the spool (neither a spool id nor a SOP Instance UID of a pending or quarantined instance; see dicom-gateway spool list)`, 404);
    if (chosen.length > 1) {
      throw new SpoolAdminError(`SOP Instance UID ${ref} names ${chosen.length} instances (${chosen.map((h) => `${h.instance.tenant} ${h.instance.state} ${h.instance.id}`).join(", ")}): give the spool id`, 409);
    }
    const hit = chosen[0]!;
    if (state && hit.instance.state !== state) {
      throw new SpoolAdminError(`instance ${hit.instance.id} of tenant ${hit.tenant.aet} is ${hit.instance.state}, not ${state}: only quarantined instances can be retried or released (a pending one is forwarded by the gateway)`, 409);
    }
    return hit;
  }

  private describe(t: AdminTenant, state: InstanceState, r: SpoolRecord, q?: { reason: string; quarantinedAt: string }): SpoolInstance {
    const received = Date.parse(r.receivedAt);
    const now = (this.opts.now ?? Date.now)();
    return {
      tenant: t.aet,
      state,
      id: r.id,
      sopInstanceUid: r.sopInstanceUid,
      sopClassUid: r.sopClassUid,
      transferSyntaxUid: r.transferSyntaxUid,
      studyInstanceUid: r.studyInstanceUid,
      seriesInstanceUid: r.seriesInstanceUid,
      patientId: r.patientId,
      callingAeTitle: r.callingAeTitle,
      peer: r.peer,
      receivedAt: r.receivedAt,
      ageSeconds: Number.isFinite(received) ? Math.max(0, Math.round((now - received) / 1000)) : 0,
      size: r.size,
      ...(q ? { reason: q.reason, quarantinedAt: q.quarantinedAt } : {}),
    };
  }
}
