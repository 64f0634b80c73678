/**
 * Who a DICOM UID belongs to where Orthanc's labels cannot tell (Strict isolation, docs/threat-model.md),
 * one registry for the whole gateway:
 *
 *  - Claims: a tenant created a study or series with this UID through this gateway. They decide for the
 *    levels a tenant does not label (LabelsStoreLevels without Study...), and after a crash between an
 *    upload and its labels. Durable: `<SpoolDirectory>/claims.jsonl`, one JSON object per line, appended
 *    and fdatasync'd before the instance that creates the resource is acknowledged; a claim that turned out
 *    dead (nothing with that UID in Orthanc, nothing in flight) is released by a later line.
 *  - In flight: an instance that passed the check and is not yet in Orthanc with its labels (spooled, or
 *    being uploaded) holds its Study, Series and SOP Instance UIDs for its tenant, so that no other tenant
 *    can take them meanwhile. In memory; rebuilt from the spools at start.
 *
 * Claims made by 0.2 named Orthanc's resource IDs (hashes) instead of UIDs: they are still read and
 * honoured (`legacyOwner`).
 */
import { open, readFile, rename, writeFile, type FileHandle } from "node:fs/promises";
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

const key = (level: ResourceLevel, uid: string) => `${level}|${uid}`;

export class UidRegistry {
  private readonly claims = new Map<string, string>();
  private readonly legacy = new Map<string, string>();
  /** level|uid -> tenant -> number of instances in flight. */
  private readonly inFlight = new Map<string, Map<string, number>>();
  /** Hold key (a spool entry id...) -> what it holds. */
  private readonly holds = new Map<string, { tenant: string; keys: string[] }>();
  private fh: FileHandle | undefined;
  /** Told when a claim is released (caches that knew the UID as owned forget it). */
  onRelease?: (level: ResourceLevel, uid: string) => void;
  private chain: Promise<unknown> = Promise.resolve();
  readonly path: string;

  constructor(spoolRoot: string) {
    this.path = join(spoolRoot, "claims.jsonl");
  }

  /** Reads the claims file (a torn last line, from a crash, is ignored: it was never acknowledged). */
  async open(): Promise<void> {
    let lines = 0;
    try {
      for (const text of (await readFile(this.path, "utf8")).split("\n")) {
        if (!text.trim()) continue;
        lines++;
        let c: ClaimLine;
        try {
          c = JSON.parse(text) as ClaimLine;
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
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
    }
    // Released claims accumulate: rewrite the file with the live ones when they are the minority.
    const live = this.claims.size + this.legacy.size;
    if (lines > 2 * live + 1000) await this.compact();
    this.fh = await open(this.path, "a", 0o600);
  }

  /** Rewrites the file with the live claims only (a new file renamed over the old one). */
  private async compact(): Promise<void> {
    const at = new Date().toISOString();
    const out: string[] = [];
    for (const [id, tenant] of this.legacy) out.push(JSON.stringify({ id, level: "Study", tenant, at }));
    for (const [k, tenant] of this.claims) {
      const [level, uid] = [k.slice(0, k.indexOf("|")), k.slice(k.indexOf("|") + 1)];
      out.push(JSON.stringify({ uid, level, tenant, at }));
    }
    const tmp = `${this.path}.tmp`;
    await writeFile(tmp, out.join("\n") + (out.length ? "\n" : ""), { mode: 0o600, flush: true });
    await rename(tmp, this.path);
  }

  /** The tenant that created a resource with this UID through this gateway, if any. */
  claimOwner(level: ResourceLevel, uid: string): string | undefined {
    return this.claims.get(key(level, uid));
  }

  /** The tenant a 0.2 claim gave this Orthanc resource ID to, if any. */
  legacyOwner(orthancId: string): string | undefined {
    return this.legacy.get(orthancId);
  }

  /** Claims `uid` at `level` for `tenant` unless another tenant holds it; durable when it resolves true. */
  claim(level: ResourceLevel, uid: string, tenant: string): Promise<boolean> {
    const k = key(level, uid);
    const current = this.claims.get(k);
    if (current !== undefined) return Promise.resolve(current === tenant);
    this.claims.set(k, tenant); // the first claimer wins, synchronously
    return this.append({ uid, level, tenant, at: new Date().toISOString() }, true).then(
      () => true,
      (e) => {
        // Not durable, so not a claim: the next attempt tries again.
        if (this.claims.get(k) === tenant) this.claims.delete(k);
        throw e;
      },
    );
  }

  /**
   * Releases a claim found dead (nothing with the UID in Orthanc, nothing in flight). Not synced: if the
   * line is lost, the claim comes back at the next start and is found dead again.
   */
  async release(level: ResourceLevel, uid: string, tenant: string): Promise<void> {
    const k = key(level, uid);
    if (this.claims.get(k) !== tenant) return;
    this.claims.delete(k);
    this.onRelease?.(level, uid);
    await this.append({ uid, level, tenant, at: new Date().toISOString(), released: true }, false).catch(() => {});
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

  private append(line: ClaimLine, sync: boolean): Promise<void> {
    const run = async () => {
      if (!this.fh) throw new Error(`the claims file ${this.path} is not open`);
      await this.fh.appendFile(JSON.stringify(line) + "\n");
      if (sync) await this.fh.datasync();
    };
    const p = this.chain.then(run, run);
    this.chain = p.catch(() => {});
    return p;
  }

  async close(): Promise<void> {
    await this.chain;
    await this.fh?.close();
    this.fh = undefined;
  }
}
