/**
 * Strict tenant isolation for C-STORE (see docs/threat-model.md).
 *
 * Orthanc files an instance under resources identified by hashes of PatientID and the UIDs
 * (src/orthanc/identity.ts). The plugin labels whatever an instance lands in, so a tenant that reuses
 * another tenant's UIDs (with the same PatientID) gets its labels onto the other tenant's study and from
 * then on sees it. Here a tenant may only store into resources it owns:
 *
 *  - a resource that does not exist yet (it will be created, and claimed, by this tenant);
 *  - a resource whose labels are all this tenant's labels (and, for LabelsConstraint All, all of them);
 *  - a resource without labels that this tenant created through this gateway (a claim, recorded durably
 *    before the instance is uploaded: covers LabelsStoreLevels without Study/Series and a crash between
 *    upload and labeling);
 *  - an instance without labels inside a series this tenant owns (a replay of its own instance);
 *  - anything, for a tenant with empty Labels (it is unrestricted, like in the plugin).
 * Patients are not checked: the same PatientID in two tenants is allowed, and never makes the other
 * tenant's studies visible (queries scope patients through studies) — except for a tenant whose
 * LabelsStoreLevels is Patient alone: its scope is whole patients, so its patients must be its own.
 */
import { open, readFile, type FileHandle } from "node:fs/promises";
import { join } from "node:path";
import type { ResourceLevel, TenantConfig } from "../config/types.ts";
import { OrthancError, type OrthancClient } from "../orthanc/client.ts";
import type { OrthancIds } from "../orthanc/identity.ts";
import { fileMetaLength } from "../dicom/part10.ts";
import type { FileRange } from "../file-range.ts";
import { DatasetHeadError, readDatasetHead, type DatasetHead } from "../dicom/dataset-head.ts";

export type IsolationVerdict =
  | { ok: true; /** Resources that do not exist yet and were claimed for the tenant. */ claimed: string[] }
  | { ok: false; level: ResourceLevel; reason: string };

const LEVEL_PATH: Record<string, string> = { Patient: "patients", Study: "studies", Series: "series", Instance: "instances" };

/**
 * Durable record of which tenant created which Orthanc study/series through this gateway:
 * `<spool root>/claims.jsonl`, one `{"id","level","tenant","at"}` per line, appended and fdatasync'd.
 */
export class ClaimRegistry {
  private readonly owners = new Map<string, string>();
  private fh: FileHandle | undefined;
  private chain: Promise<unknown> = Promise.resolve();
  readonly path: string;

  constructor(spoolRoot: string) {
    this.path = join(spoolRoot, "claims.jsonl");
  }

  async open(): Promise<void> {
    try {
      for (const line of (await readFile(this.path, "utf8")).split("\n")) {
        if (!line.trim()) continue;
        try {
          const c = JSON.parse(line) as { id: string; tenant: string };
          if (!this.owners.has(c.id)) this.owners.set(c.id, c.tenant);
        } catch {
          // a torn last line after a crash: that claim was never acknowledged
        }
      }
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
    }
    this.fh = await open(this.path, "a", 0o600);
  }

  owner(id: string): string | undefined {
    return this.owners.get(id);
  }

  /** Claims `id` for `tenant` unless another tenant holds it; durable when it resolves true. */
  claim(id: string, level: ResourceLevel, tenant: string): Promise<boolean> {
    const current = this.owners.get(id);
    if (current !== undefined) return Promise.resolve(current === tenant);
    this.owners.set(id, tenant); // first claimer wins, synchronously
    const run = async () => {
      try {
        await this.fh!.appendFile(JSON.stringify({ id, level, tenant, at: new Date().toISOString() }) + "\n");
        await this.fh!.datasync();
        return true;
      } catch (e) {
        // Not durable, so not a claim: the next attempt tries again.
        if (this.owners.get(id) === tenant) this.owners.delete(id);
        throw e;
      }
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

/** Whether a resource with these labels belongs to the tenant (see the file header). */
export function ownsByLabels(labels: readonly string[], tenant: Pick<TenantConfig, "labels" | "labelsConstraint">): boolean {
  if (labels.length === 0) return false;
  const mine = new Set(tenant.labels);
  if (!labels.every((l) => mine.has(l))) return false;
  return tenant.labelsConstraint === "All" ? tenant.labels.every((l) => labels.includes(l)) : true;
}

export class IsolationGuard {
  /** Resources known to be this tenant's (bounded cache; avoids a REST call per instance for a study). */
  private readonly known = new Map<string, true>();

  constructor(
    private readonly orthanc: OrthancClient,
    private readonly claims: ClaimRegistry,
    private readonly tenant: TenantConfig,
  ) {}

  /**
   * Checks that storing an instance with these Orthanc IDs stays within the tenant; claims the study and
   * series that do not exist yet. Throws OrthancError when Orthanc cannot be asked (the caller decides:
   * Spool mode acknowledges and checks again when forwarding, Sync mode fails).
   * With `claimsOnly` (Orthanc unreachable), only other tenants' claims are consulted and nothing is claimed.
   */
  async check(ids: OrthancIds, opts: { signal?: AbortSignal; claimsOnly?: boolean } = {}): Promise<IsolationVerdict> {
    if (this.tenant.labels.length === 0) return { ok: true, claimed: [] };
    const aet = this.tenant.aet;
    const claimed: string[] = [];
    let parentOwned = false;
    // A tenant that labels patients and nothing below sees whole patients: its patients must be its own too.
    const patientAnchored = this.tenant.labelsStoreLevels.includes("Patient") && !this.tenant.labelsStoreLevels.some((l) => l !== "Patient");
    const levels: (readonly [ResourceLevel, string])[] = [
      ...(patientAnchored ? [["Patient", ids.patient] as const] : []),
      ["Study", ids.study],
      ["Series", ids.series],
      ["Instance", ids.instance],
    ];
    for (const [level, id] of levels) {
      // An instance lives in its series (its ID hashes the series'): an owned series answers for it.
      if (level === "Instance" && parentOwned && this.known.has(ids.series)) break;
      if (this.known.has(id)) {
        parentOwned = true;
        continue;
      }
      const owner = this.claims.owner(id);
      if (owner !== undefined && owner !== aet) {
        return { ok: false, level, reason: `${level.toLowerCase()} ${id} belongs to another tenant (created through AE ${owner})` };
      }
      // Without Orthanc nothing may be claimed: the resource might exist there already (unlabeled, not ours).
      if (opts.claimsOnly) continue;
      let labels: string[] | undefined;
      try {
        labels = await this.orthanc.getJson<string[]>(`/${LEVEL_PATH[level]}/${id}/labels`, { signal: opts.signal });
      } catch (e) {
        if (e instanceof OrthancError && e.status === 404) labels = undefined;
        else throw e;
      }
      if (labels === undefined) {
        // Not in Orthanc yet: this tenant creates it. Instances need no claim (their series is owned).
        if (level !== "Instance") {
          if (!(await this.claims.claim(id, level, aet))) {
            return { ok: false, level, reason: `${level.toLowerCase()} ${id} is being created by another tenant` };
          }
          claimed.push(id);
          this.remember(id);
        }
        parentOwned = true;
        continue;
      }
      const owned = ownsByLabels(labels, this.tenant) || (labels.length === 0 && (owner === aet || (level === "Instance" && parentOwned)));
      if (!owned) {
        const why = labels.length === 0 ? "exists in Orthanc without labels and was not created by this tenant" : `carries labels [${labels.join(", ")}] outside this tenant's`;
        return { ok: false, level, reason: `${level.toLowerCase()} ${id} ${why}` };
      }
      if (level !== "Instance") this.remember(id);
      parentOwned = true;
    }
    return { ok: true, claimed };
  }

  /** Forget what is cached (e.g. after Orthanc's database was replaced). */
  clear(): void {
    this.known.clear();
  }

  private remember(id: string): void {
    if (this.known.size >= 20_000) this.known.delete(this.known.keys().next().value!);
    this.known.set(id, true);
  }
}

/** The first bytes of a spooled Part 10 file's data set (after the meta header), enough for readDatasetHead. */
export async function readFileDatasetHead(at: FileRange, max = 1 << 20): Promise<Uint8Array> {
  const fh = await open(at.file, "r");
  try {
    const buf = new Uint8Array(Math.min(max, at.size));
    const { bytesRead } = await fh.read(buf, 0, buf.length, at.offset);
    const head = buf.subarray(0, bytesRead);
    return head.subarray(fileMetaLength(head) ?? head.length);
  } finally {
    await fh.close();
  }
}

/** The placement attributes of a spooled file: from its first 64 KiB, or its first MiB if needed. */
export async function readFileHeadAttributes(at: FileRange, transferSyntax: string): Promise<DatasetHead> {
  try {
    return readDatasetHead(await readFileDatasetHead(at, 64 * 1024), transferSyntax);
  } catch (e) {
    if (!(e instanceof DatasetHeadError && e.truncated)) throw e;
    return readDatasetHead(await readFileDatasetHead(at), transferSyntax);
  }
}
