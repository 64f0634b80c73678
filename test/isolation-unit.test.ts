/** Units behind Strict isolation: Orthanc identities, ownership by labels, claims and instances in flight (the strict reader: dataset-reader.test.ts). */
import { describe, expect, test } from "bun:test";
import { appendFileSync, mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { decodeFileMeta, explicitVrElement, fileMetaLength } from "../src/dicom/part10.ts";
import { orthancIds } from "../src/orthanc/identity.ts";
import { ownsByLabels } from "../src/tenancy/isolation.ts";
import { UidRegistry } from "../src/tenancy/ownership.ts";
import { pydicomFile } from "./helpers/dicom-files.ts";

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
  test("claims by UID: the first claimer wins; they survive a restart; a torn last line is ignored", async () => {
    const dir = mkdtempSync(join(tmpdir(), "gw-claims-"));
    const a = new UidRegistry(dir);
    await a.open();
    const [first, second, again] = await Promise.all([a.claim("Study", "1.2.3", "ALPHA"), a.claim("Study", "1.2.3", "BETA"), a.claim("Study", "1.2.3", "ALPHA")]);
    expect([first, second, again]).toEqual([true, false, true]);
    await a.claim("Series", "1.2.3.4", "BETA");
    // The same UID at another level is another claim.
    expect(await a.claim("Series", "1.2.3", "BETA")).toBe(true);
    await a.close();
    appendFileSync(join(dir, "claims.jsonl"), '{"uid":"1.2.9","lev');
    const b = new UidRegistry(dir);
    await b.open();
    expect(b.claimOwner("Study", "1.2.3")).toBe("ALPHA");
    expect(b.claimOwner("Series", "1.2.3.4")).toBe("BETA");
    expect(b.claimOwner("Study", "1.2.9")).toBeUndefined();
    expect(await b.claim("Study", "1.2.3", "BETA")).toBe(false);
    await b.close();
  });

  test("a released claim stays released after a restart, and tells who listens; 0.2 claims (Orthanc IDs) are still honoured", async () => {
    const dir = mkdtempSync(join(tmpdir(), "gw-claims-"));
    appendFileSync(join(dir, "claims.jsonl"), JSON.stringify({ id: "0f1e2d3c-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd", level: "Study", tenant: "OLD", at: "2026-01-01T00:00:00Z" }) + "\n");
    const a = new UidRegistry(dir);
    await a.open();
    expect(a.legacyOwner("0f1e2d3c-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd")).toBe("OLD");
    await a.claim("Study", "1.2.5", "ALPHA");
    const released: string[] = [];
    a.onRelease = (level, uid) => released.push(`${level} ${uid}`);
    await a.release("Study", "1.2.5", "BETA"); // not BETA's: nothing happens
    expect(a.claimOwner("Study", "1.2.5")).toBe("ALPHA");
    await a.release("Study", "1.2.5", "ALPHA");
    expect(released).toEqual(["Study 1.2.5"]);
    expect(a.claimOwner("Study", "1.2.5")).toBeUndefined();
    await a.close();
    const b = new UidRegistry(dir);
    await b.open();
    expect(b.claimOwner("Study", "1.2.5")).toBeUndefined();
    expect(await b.claim("Study", "1.2.5", "BETA")).toBe(true);
    await b.close();
  });

  test("instances in flight hold their three UIDs for their tenant until released", async () => {
    const r = new UidRegistry(mkdtempSync(join(tmpdir(), "gw-claims-")));
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
