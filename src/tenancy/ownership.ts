/**
 * What one gateway knows of who holds a DICOM UID, besides Orthanc (Strict isolation, docs/threat-model.md),
 * one registry for the whole gateway:
 *
 *  - In flight: an instance that passed the check and is not yet in Orthanc with its labels (spooled, or
 *    being uploaded) holds its Study, Series and SOP Instance UIDs for its tenant, so that no other tenant of
 *    this gateway can take them meanwhile. In memory; rebuilt from the spools at start. Another gateway does
 *    not see them: between gateways, the ownership records in Orthanc decide (owner-records.ts).
 *  - Legacy claims: `<SpoolDirectory>/claims.jsonl`, where earlier gateways recorded which tenant created
 *    which study or series (by UID; 0.2 by Orthanc ID). Read at start, honoured until they are migrated into
 *    Orthanc's ownership records (migrate-claims.ts), then the file is renamed `claims.jsonl.migrated`.
 *    Nothing is written to it any more.
 */
import { readFile, rename } from "node:fs/promises";
import { join } from "node:path";
import type { ResourceLevel } from "../config/types.ts";

/** The levels a UID identifies (a patient is identified by its PatientID, which is not unique to a tenant). */
export type UidLevel = Exclude<ResourceLevel, "Patient">;

/** The UIDs an instance holds while it is in flight. */
export interface InstanceUids {
  studyInstanceUid: string;
  seriesInstanceUid: string;
  sopInstanceUid: string;
}

interface ClaimLine {
  uid?: string;
  /** 0.2: an Orthanc resource ID. */
  id?: string;
  level: ResourceLevel;
  tenant: string;
  at: string;
  released?: true;
}

/** A live claim of the legacy file: by UID, or (0.2) by Orthanc ID. */
export type LegacyClaim = { level: ResourceLevel; tenant: string } & ({ uid: string; id?: undefined } | { id: string; uid?: undefined });

const key = (level: ResourceLevel, uid: string) => `${level}|${uid}`;

export class UidRegistry {
  private readonly claims = new Map<string, string>();
  private readonly legacy = new Map<string, string>();
  /** level|uid -> tenant -> number of instances in flight. */
  private readonly inFlight = new Map<string, Map<string, number>>();
  /** Hold key (a spool entry id...) -> what it holds. */
  private readonly holds = new Map<string, { tenant: string; keys: string[] }>();
  /** The legacy claims file. */
  readonly path: string;

  constructor(spoolRoot: string) {
    this.path = join(spoolRoot, "claims.jsonl");
  }

  /** Reads the legacy claims file, if there is one (a torn last line, from a crash, is ignored). */
  async open(): Promise<void> {
    let text: string;
    try {
      text = await readFile(this.path, "utf8");
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return;
      throw e;
    }
    for (const line of text.split("\n")) {
      if (!line.trim()) continue;
      let c: ClaimLine;
      try {
        c = JSON.parse(line) as ClaimLine;
      } catch {
        continue;
      }
      if (typeof c.tenant !== "string" || typeof c.level !== "string") continue;
      if (typeof c.uid === "string") {
        const k = key(c.level, c.uid);
        if (c.released) {
          if (this.claims.get(k) === c.tenant) this.claims.delete(k);
        } else if (!this.claims.has(k)) this.claims.set(k, c.tenant);
      } else if (typeof c.id === "string" && !this.legacy.has(c.id)) this.legacy.set(c.id, c.tenant);
    }
  }

  /** The tenant that created a resource with this UID through this gateway, by the legacy file (until migrated). */
  claimOwner(level: ResourceLevel, uid: string): string | undefined {
    return this.claims.get(key(level, uid));
  }

  /** The tenant a 0.2 claim gave this Orthanc resource ID to, if any (until migrated). */
  legacyOwner(orthancId: string): string | undefined {
    return this.legacy.get(orthancId);
  }

  /** The live claims of the legacy file, to migrate into Orthanc. */
  legacyClaims(): LegacyClaim[] {
    const out: LegacyClaim[] = [];
    for (const [id, tenant] of this.legacy) out.push({ id, level: "Study", tenant });
    for (const [k, tenant] of this.claims) out.push({ level: k.slice(0, k.indexOf("|")) as ResourceLevel, uid: k.slice(k.indexOf("|") + 1), tenant });
    return out;
  }

  /** The legacy claims are in Orthanc now: forgotten here, the file renamed `claims.jsonl.migrated` (kept for the record). */
  async migrated(): Promise<void> {
    this.claims.clear();
    this.legacy.clear();
    try {
      await rename(this.path, `${this.path}.migrated`);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
    }
  }

  /** Tenants with instances in flight that hold `uid` at `level`. */
  holders(level: UidLevel, uid: string): ReadonlyMap<string, number> | undefined {
    return this.inFlight.get(key(level, uid));
  }

  /** A tenant other than `tenant` that holds `uid` at `level` in flight, if any. */
  otherHolder(level: UidLevel, uid: string, tenant: string): string | undefined {
    for (const t of this.inFlight.get(key(level, uid))?.keys() ?? []) if (t !== tenant) return t;
    return undefined;
  }

  /** Marks an instance's UIDs as in flight for `tenant` under `holdKey` (idempotent per key). */
  hold(holdKey: string, tenant: string, uids: InstanceUids): void {
    if (this.holds.has(holdKey)) return;
    const keys = [key("Study", uids.studyInstanceUid), key("Series", uids.seriesInstanceUid), key("Instance", uids.sopInstanceUid)];
    for (const k of keys) {
      let m = this.inFlight.get(k);
      if (!m) this.inFlight.set(k, (m = new Map()));
      m.set(tenant, (m.get(tenant) ?? 0) + 1);
    }
    this.holds.set(holdKey, { tenant, keys });
  }

  /** The instance held under `holdKey` is in Orthanc, refused or quarantined. */
  releaseHold(holdKey: string): void {
    const h = this.holds.get(holdKey);
    if (!h) return;
    this.holds.delete(holdKey);
    for (const k of h.keys) {
      const m = this.inFlight.get(k);
      if (!m) continue;
      const n = (m.get(h.tenant) ?? 1) - 1;
      if (n > 0) m.set(h.tenant, n);
      else m.delete(h.tenant);
      if (m.size === 0) this.inFlight.delete(k);
    }
  }

  /** Number of instances in flight (for tests and /status). */
  get holdCount(): number {
    return this.holds.size;
  }
}
