/** Units behind Strict isolation: Orthanc identities, ownership by labels, legacy claims and instances in flight (the strict reader: dataset-reader.test.ts). */
import { describe, expect, test } from "bun:test";
import { appendFileSync, existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { decodeFileMeta, explicitVrElement, fileMetaLength } from "../src/dicom/part10.ts";
import { orthancIds } from "../src/orthanc/identity.ts";
import { ownsByLabels } from "../src/tenancy/isolation.ts";
import { UidRegistry } from "../src/tenancy/ownership.ts";
import { pydicomFile } from "./helpers/dicom-files.ts";
import { tempDir } from "./helpers/temp.ts";

function dataset(name: string): { bytes: Uint8Array; ts: string } {
  const b = new Uint8Array(readFileSync(pydicomFile(name)));
  return { bytes: b.subarray(fileMetaLength(b)!), ts: decodeFileMeta(b).transferSyntaxUid };
}

const el = explicitVrElement;
const text = (s: string) => new TextEncoder().encode(s.length % 2 ? s + " " : s);
const uid = (s: string) => new TextEncoder().encode(s.length % 2 ? s + "\0" : s);

test("orthancIds: Orthanc's SHA-1 identifiers (the instance ID includes patient, study and series)", () => {
  const ids = orthancIds({ patientId: "1CT1", studyInstanceUid: "1.2", seriesInstanceUid: "1.2.3", sopInstanceUid: "1.2.3.4" });
  for (const id of Object.values(ids)) expect(id).toMatch(/^[0-9a-f]{8}(-[0-9a-f]{8}){4}$/);
  expect(orthancIds({ patientId: "OTHER", studyInstanceUid: "1.2", seriesInstanceUid: "1.2.3", sopInstanceUid: "1.2.3.4" }).study).not.toBe(ids.study);
});

test("ownsByLabels: only the tenant's labels (all of them with All)", () => {
  const all = { labels: ["a", "b"], labelsConstraint: "All" as const };
  const any = { labels: ["a", "b"], labelsConstraint: "Any" as const };
  expect(ownsByLabels(["a", "b"], all)).toBe(true);
  expect(ownsByLabels(["a"], all)).toBe(false);
  expect(ownsByLabels(["a"], any)).toBe(true);
  expect(ownsByLabels(["a", "c"], any)).toBe(false); // a foreign label: shared, nobody's to write into
  expect(ownsByLabels([], any)).toBe(false);
});

describe("UidRegistry", () => {
  test("a legacy claims file is read (released claims stay released, a torn last line is ignored, 0.2 claims by Orthanc ID) and renamed once migrated", async () => {
    const dir = tempDir("gw-claims-");
    const line = (o: Record<string, unknown>) => JSON.stringify({ at: "2026-01-01T00:00:00Z", ...o }) + "\n";
    appendFileSync(
      join(dir, "claims.jsonl"),
      line({ uid: "1.2.3", level: "Study", tenant: "ALPHA" }) +
        line({ uid: "1.2.3", level: "Study", tenant: "BETA" }) + // a later claim of a claimed UID is not the owner
        line({ uid: "1.2.3.4", level: "Series", tenant: "BETA" }) +
        line({ uid: "1.2.5", level: "Study", tenant: "ALPHA" }) +
        line({ uid: "1.2.5", level: "Study", tenant: "ALPHA", released: true }) +
        line({ id: "0f1e2d3c-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd", level: "Study", tenant: "OLD" }) +
        '{"uid":"1.2.9","lev',
    );
    const r = new UidRegistry(dir);
    await r.open();
    expect(r.claimOwner("Study", "1.2.3")).toBe("ALPHA");
    expect(r.claimOwner("Series", "1.2.3.4")).toBe("BETA");
    expect(r.claimOwner("Study", "1.2.5")).toBeUndefined();
    expect(r.claimOwner("Study", "1.2.9")).toBeUndefined();
    expect(r.legacyOwner("0f1e2d3c-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd")).toBe("OLD");
    expect(r.legacyClaims()).toEqual([
      { id: "0f1e2d3c-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd", level: "Study", tenant: "OLD" },
      { uid: "1.2.3", level: "Study", tenant: "ALPHA" },
      { uid: "1.2.3.4", level: "Series", tenant: "BETA" },
    ]);
    await r.migrated();
    expect(r.legacyClaims()).toEqual([]);
    expect(r.claimOwner("Study", "1.2.3")).toBeUndefined();
    expect(existsSync(join(dir, "claims.jsonl"))).toBe(false);
    expect(readFileSync(join(dir, "claims.jsonl.migrated"), "utf8")).toContain('"uid":"1.2.3"');
    // A gateway without a claims file has nothing to migrate.
    const empty = new UidRegistry(tempDir("gw-claims-"));
    await empty.open();
    expect(empty.legacyClaims()).toEqual([]);
  });

  test("instances in flight hold their three UIDs for their tenant until released", async () => {
    const r = new UidRegistry(tempDir("gw-claims-"));
    const uids = { studyInstanceUid: "1.2", seriesInstanceUid: "1.2.3", sopInstanceUid: "1.2.3.4" };
    r.hold("e1", "ALPHA", uids);
    r.hold("e1", "ALPHA", uids); // idempotent per key
    r.hold("e2", "ALPHA", { ...uids, sopInstanceUid: "1.2.3.5" });
    expect(r.otherHolder("Study", "1.2", "BETA")).toBe("ALPHA");
    expect(r.otherHolder("Study", "1.2", "ALPHA")).toBeUndefined();
    expect(r.holders("Instance", "1.2.3.4")?.get("ALPHA")).toBe(1);
    r.releaseHold("e1");
    expect(r.otherHolder("Instance", "1.2.3.4", "BETA")).toBeUndefined();
    expect(r.otherHolder("Series", "1.2.3", "BETA")).toBe("ALPHA");
    r.releaseHold("e2");
    expect(r.otherHolder("Study", "1.2", "BETA")).toBeUndefined();
    expect(r.holdCount).toBe(0);
  });
});
