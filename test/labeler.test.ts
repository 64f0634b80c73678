/**
 * Labels pipelined behind uploads (src/orthanc/labeler.ts, store.ts uploadLabeled) against a real
 * Orthanc: one round trip per upload, a parent's labels put once and then read back, a parent that lost
 * its label (removed by another client, or its study deleted and created again) labeled again. On Orthanc's
 * own box (not link-bound), with its change log: parents known labeled are trusted (no read-back costs
 * Orthanc), and labeled again when the change log shows them created again.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { ChangesFeed } from "../src/orthanc/changes.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { Labeler } from "../src/orthanc/labeler.ts";
import { uploadLabeled } from "../src/orthanc/store.ts";
import { freshUid } from "./helpers/dicom-build.ts";
import { buildInstance } from "./helpers/instances.ts";
import { getSharedOrthanc, ORTHANC_START_TIMEOUT_MS, type OrthancHandle } from "./helpers/orthanc.ts";

const TENANT = { labels: ["lab-a", "lab-b"], labelsStoreLevels: ["Study", "Series", "Instance"] } as const;

describe("labels pipelined behind uploads", () => {
  let orthanc: OrthancHandle;
  let client: OrthancClient;
  let labeler: Labeler;

  beforeAll(async () => {
    orthanc = await getSharedOrthanc();
    client = new OrthancClient({ url: orthanc.url });
    labeler = new Labeler(client);
  }, ORTHANC_START_TIMEOUT_MS);
  afterAll(() => client?.close());

  const labelsOf = async (path: string) => ((await client.getJson<string[]>(`${path}/labels`)) ?? []).sort();
  const upload = async (x: ReturnType<typeof buildInstance>) => uploadLabeled(client, labeler, x.bytes, labeler.plan(x.ids, TENANT));
  const delta = <T>(before: Record<string, { calls: number; roundTrips: number } | undefined>, kind: string) => {
    const now = client.calls[kind as keyof typeof client.calls];
    const was = before[kind];
    return { calls: (now?.calls ?? 0) - (was?.calls ?? 0), roundTrips: (now?.roundTrips ?? 0) - (was?.roundTrips ?? 0) } as T;
  };

  test("the first upload of a series puts every label, the next ones read the parents' back: one round trip each", async () => {
    const study = freshUid();
    const series = freshUid();
    const [x, y] = [buildInstance(1000, { study, series }), buildInstance(1000, { study, series })];
    let before = client.calls;
    expect((await upload(x)).labeled).toBe(true);
    expect(delta(before, "label")).toEqual({ calls: 6, roundTrips: 0 });
    expect(delta(before, "upload")).toEqual({ calls: 1, roundTrips: 1 });
    before = client.calls;
    expect((await upload(y)).labeled).toBe(true);
    expect(delta(before, "label")).toEqual({ calls: 2, roundTrips: 0 });
    expect(delta(before, "resource")).toEqual({ calls: 2, roundTrips: 0 });
    expect(delta(before, "upload")).toEqual({ calls: 1, roundTrips: 1 });
    for (const p of [`/studies/${x.ids.study}`, `/series/${x.ids.series}`, `/instances/${x.ids.instance}`, `/instances/${y.ids.instance}`]) expect(await labelsOf(p)).toEqual(["lab-a", "lab-b"]);
  });

  test("a parent label removed by another client is put again by the next upload (one more round trip)", async () => {
    const study = freshUid();
    const series = freshUid();
    const [x, y] = [buildInstance(1000, { study, series }), buildInstance(1000, { study, series })];
    await upload(x);
    await client.delete(`/series/${x.ids.series}/labels/lab-b`);
    const before = client.calls;
    await upload(y);
    // The instance's two labels pipelined, then the series' lab-b on its own.
    expect(delta(before, "label")).toEqual({ calls: 3, roundTrips: 1 });
    expect(await labelsOf(`/series/${x.ids.series}`)).toEqual(["lab-a", "lab-b"]);
  });

  test("a study deleted and created again by the next upload gets its labels again", async () => {
    const study = freshUid();
    const series = freshUid();
    const [x, y] = [buildInstance(1000, { study, series }), buildInstance(1000, { study, series })];
    await upload(x);
    await client.delete(`/studies/${x.ids.study}`);
    await upload(y);
    for (const p of [`/studies/${y.ids.study}`, `/series/${y.ids.series}`, `/instances/${y.ids.instance}`]) expect(await labelsOf(p)).toEqual(["lab-a", "lab-b"]);
  });

  test("an upload Orthanc files elsewhere than computed: labeled false, the instance Orthanc made left unlabeled for the caller", async () => {
    const x = buildInstance(1000);
    // The gateway's reading of PatientID differs from Orthanc's (a plan for another PatientID's IDs).
    const other = buildInstance(1000, { patientId: "SOMEONE-ELSE", study: x.study, series: x.series });
    const up = await uploadLabeled(client, labeler, x.bytes, labeler.plan(other.ids, TENANT));
    expect(up.labeled).toBe(false);
    expect(up.stored.id).toBe(x.ids.instance);
    expect(await labelsOf(`/instances/${x.ids.instance}`)).toEqual([]);
  });
});

describe("on Orthanc's own box, with its change log", () => {
  let orthanc: OrthancHandle;
  let client: OrthancClient;
  let feed: ChangesFeed;
  let labeler: Labeler;

  beforeAll(async () => {
    orthanc = await getSharedOrthanc();
    client = new OrthancClient({ url: orthanc.url });
    // Polled only when an upload asks for it (a long interval: no background poll during a test).
    feed = new ChangesFeed(client, 3_600_000);
    await feed.sync();
    // The round trip is the least of recent small calls: a connection's first may take longer than 2 ms.
    for (let i = 0; i < 5; i++) await client.system();
    labeler = new Labeler(client, { feed });
  }, ORTHANC_START_TIMEOUT_MS);
  afterAll(() => {
    feed?.stop();
    client?.close();
  });

  const labelsOf = async (path: string) => ((await client.getJson<string[]>(`${path}/labels`)) ?? []).sort();
  const upload = async (x: ReturnType<typeof buildInstance>) => uploadLabeled(client, labeler, x.bytes, labeler.plan(x.ids, TENANT));

  test("parents known labeled are trusted, not read back; a study deleted and created again gets its labels again", async () => {
    expect(client.linkBound).toBe(false);
    const study = freshUid();
    const series = freshUid();
    const [x, y, z] = [buildInstance(1000, { study, series }), buildInstance(1000, { study, series }), buildInstance(1000, { study, series })];
    await upload(x);
    // Known labeled: nothing planned for the parents but trust.
    const plan = labeler.plan(y.ids, TENANT);
    expect(plan.check).toEqual([]);
    expect(plan.put.map((p) => p.level)).toEqual(["Instance", "Instance"]);
    expect(plan.trusted.map((t) => `${t.level}/${t.label}`).sort()).toEqual(["Series/lab-a", "Series/lab-b", "Study/lab-a", "Study/lab-b"]);
    const before = client.calls.resource?.calls ?? 0;
    expect((await uploadLabeled(client, labeler, y.bytes, plan)).labeled).toBe(true);
    expect((client.calls.resource?.calls ?? 0) - before).toBe(0);
    // Deleted (its labels with it) and created again by the next upload: the change log shows it.
    await client.delete(`/studies/${x.ids.study}`);
    expect((await upload(z)).labeled).toBe(true);
    for (const p of [`/studies/${z.ids.study}`, `/series/${z.ids.series}`, `/instances/${z.ids.instance}`]) expect(await labelsOf(p)).toEqual(["lab-a", "lab-b"]);
  });
});
