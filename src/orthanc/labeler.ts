/**
 * Which of a tenant's labels an upload puts, and which it checks, so that a study of 500 instances costs
 * one study label call, not 500 — and no round trip of its own.
 *
 * The labels go with the upload, pipelined behind it on its connection (store.ts: uploadLabeled), so
 * Orthanc handles them once the instance is stored: the instance's own labels are put; a parent's
 * (study, series, patient) are put the first time, and afterwards only read back (GET .../labels, cheaper
 * for Orthanc than a write). A parent whose label is then missing — deleted and created again by this
 * very upload, or relabeled by another client — gets it put again (settle()). What is known labeled is
 * remembered, bounded.
 *
 * On Orthanc's own box (not link-bound: OrthancApi.linkBound) a round trip costs nothing, but each read-back
 * costs Orthanc, which shares this box's CPU: with Orthanc's change log (`feed`), a parent known labeled less
 * than `ttlMs` ago is trusted instead — unless the change log, read once after the upload (one poll shared by
 * every upload of that moment), shows it created again since (deleted and sent again: its labels went with it).
 */
import type { ResourceLevel } from "../config/types.ts";
import type { ChangesFeed } from "./changes.ts";
import type { OrthancApi } from "./nodes.ts";
import type { OrthancIds } from "./identity.ts";

const LEVEL_PATH: Record<ResourceLevel, string> = { Patient: "patients", Study: "studies", Series: "series", Instance: "instances" };

/** PUT path of a label on a resource. */
export function labelPath(level: ResourceLevel, id: string, label: string): string {
  return `/${LEVEL_PATH[level]}/${id}/labels/${encodeURIComponent(label)}`;
}

/** GET path of a resource's labels. */
export function labelsPath(level: ResourceLevel, id: string): string {
  return `/${LEVEL_PATH[level]}/${id}/labels`;
}

export interface PlannedLabel {
  level: ResourceLevel;
  id: string;
  label: string;
}

/** A parent known labeled: its labels are read back after the upload. */
export interface LabelCheck {
  level: ResourceLevel;
  id: string;
  labels: string[];
}

/** What one upload does about labels (Labeler.plan). */
export interface LabelPlan {
  /** Where the instance goes (computed by the gateway from its data set). */
  ids: OrthancIds;
  /** Put with the upload: the instance's labels, and the parents' not known to be there. */
  put: PlannedLabel[];
  /** Parents known labeled: read back with the upload. */
  check: LabelCheck[];
  /** Parents known labeled, trusted (not link-bound): put again only if the change log shows them created since `seq`. */
  trusted: (PlannedLabel & { seq: number })[];
}

export interface LabeledTenant {
  labels: readonly string[];
  labelsStoreLevels: readonly ResourceLevel[];
}

const key = (level: ResourceLevel, id: string, label: string) => `${level}/${id}/${label}`;

export class Labeler {
  /** level/id/label of parents known labeled -> the change log's sequence number and the time then. */
  private readonly known = new Map<string, { seq: number; at: number }>();

  constructor(
    private readonly client: OrthancApi,
    private readonly opts: { cacheSize?: number; feed?: ChangesFeed; ttlMs?: number } = {},
  ) {}

  /** The labels an upload to `ids` puts, and the parents' it reads back or trusts. No I/O. */
  plan(ids: OrthancIds, tenant: LabeledTenant): LabelPlan {
    const byLevel: Record<ResourceLevel, string> = { Patient: ids.patient, Study: ids.study, Series: ids.series, Instance: ids.instance };
    const plan: LabelPlan = { ids, put: [], check: [], trusted: [] };
    const trust = this.opts.feed !== undefined && !this.client.linkBound;
    const now = Date.now();
    for (const level of tenant.labelsStoreLevels) {
      const id = byLevel[level];
      const checked: string[] = [];
      for (const label of tenant.labels) {
        // Instances are new (or a replay): always label them; parents only while not known labeled.
        const known = level === "Instance" ? undefined : this.known.get(key(level, id, label));
        if (!known) plan.put.push({ level, id, label });
        else if (trust && known.seq >= 0 && now - known.at < (this.opts.ttlMs ?? 60_000)) plan.trusted.push({ level, id, label, seq: known.seq });
        else checked.push(label);
      }
      if (checked.length > 0) plan.check.push({ level, id, labels: checked });
    }
    return plan;
  }

  /**
   * The trusted parents of a plan (not link-bound) that the change log, read as of `since` (performance.now()
   * when the upload was answered), shows created again: their labels are to be put again.
   */
  async recreated(plan: LabelPlan, since: number, signal?: AbortSignal): Promise<PlannedLabel[]> {
    const feed = this.opts.feed;
    if (plan.trusted.length === 0 || !feed) return [];
    if (signal?.aborted) throw signal.reason;
    await feed.syncSince(since);
    const again: PlannedLabel[] = [];
    for (const t of plan.trusted) {
      if (!feed.createdSince(t.id, t.seq)) continue;
      this.known.delete(key(t.level, t.id, t.label));
      again.push({ level: t.level, id: t.id, label: t.label });
    }
    return again;
  }

  /**
   * After the upload and its pipelined label calls: remembers the parents labeled, and answers the
   * labels to put again — those a checked parent no longer has (`found`: its labels as read back, in
   * plan.check's order; undefined when the read failed).
   */
  settle(plan: LabelPlan, found: (string[] | undefined)[], seq = this.opts.feed?.lastSeq ?? -1): PlannedLabel[] {
    for (const p of plan.put) if (p.level !== "Instance") this.remember(key(p.level, p.id, p.label), seq);
    const again: PlannedLabel[] = [];
    plan.check.forEach((c, i) => {
      const has = new Set(found[i] ?? []);
      for (const label of c.labels) {
        if (has.has(label)) {
          this.remember(key(c.level, c.id, label), seq);
          continue;
        }
        this.known.delete(key(c.level, c.id, label));
        again.push({ level: c.level, id: c.id, label });
      }
    });
    return again;
  }

  /** Puts labels (those settle() found missing, or every label of a plan), then remembers the parents'. */
  async put(labels: PlannedLabel[], signal?: AbortSignal): Promise<void> {
    const seq = this.opts.feed?.lastSeq ?? -1;
    await Promise.all(labels.map((p) => this.client.put(labelPath(p.level, p.id, p.label), "", { signal })));
    for (const p of labels) if (p.level !== "Instance") this.remember(key(p.level, p.id, p.label), seq);
  }

  /**
   * Puts the tenant's labels on an instance Orthanc stored at `ids` (Orthanc's answer: store.ts
   * storedIds) and on its parents, every one of them, without pipelining. Resolves with the calls made.
   */
  async apply(ids: OrthancIds, tenant: LabeledTenant, signal?: AbortSignal): Promise<number> {
    const byLevel: Record<ResourceLevel, string> = { Patient: ids.patient, Study: ids.study, Series: ids.series, Instance: ids.instance };
    const all = tenant.labelsStoreLevels.flatMap((level) => tenant.labels.map((label) => ({ level, id: byLevel[level], label })));
    await this.put(all, signal);
    return all.length;
  }

  /** Forget everything remembered (Orthanc's database was replaced). */
  clear(): void {
    this.known.clear();
  }

  /** `seq`: the change log's position when the label was known put (-1: no change log; never trusted). */
  private remember(k: string, seq: number): void {
    this.known.delete(k);
    if (this.known.size >= (this.opts.cacheSize ?? 50_000)) {
      const oldest = this.known.keys().next().value;
      if (oldest !== undefined) this.known.delete(oldest);
    }
    this.known.set(k, { seq, at: Date.now() });
  }
}
