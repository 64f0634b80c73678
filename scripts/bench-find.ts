/**
 * C-FIND benchmark: the gateway against Orthanc's MultitenantDicom plugin, on the same Orthanc and
 * the same labeled data, in one run.
 *
 * 100 study-level queries (one per patient, by PatientID; once with the computed ModalitiesInStudy and
 * NumberOfStudyRelatedInstances, which the plugin never returns, once without), 100 series-level
 * queries (one per study, by StudyInstanceUID), and 20 study-list queries (every study, with the computed
 * keys: a viewer's study list) are sent on one association each (findscu with the query files), to the
 * plugin's tenant and to the gateway's tenant, alternately, `--rounds` times. Per-query latency
 * is read from findscu's own log timestamps (request sent -> final response received). The gateway runs
 * as its own process (bun src/cli.ts serve), as in production: in this process it would share an event
 * loop with the benchmark reading findscu's log. It is warmed up first (`--warmup` associations per
 * kind: JavaScriptCore optimizes a function after some thousands of calls, which a gateway in service
 * has long passed).
 *
 * What no gateway over Orthanc's REST API can go below is printed beside: its /tools/find requests,
 * recorded beforehand through an in-process gateway, are replayed to Orthanc alone with the gateway's
 * own HTTP client (one REST round trip per query), and findscu's own share of each query (sending,
 * reading the answer, the network) is the gateway's latency minus the gateway's own time per
 * operation (from its /metrics). Their sum is the floor of a gateway that did no work at all.
 *
 * `--rtt MS --mbit N` (issue 18): findscu reaches the plugin across an emulated WAN link
 * (scripts/link-emulator.ts), the gateway (at the site, with findscu) reaches Orthanc's REST API across
 * it, and so does the replay of the floor. Each row then also prints the floors of a query's traffic over
 * the link: its round trips × RTT (one per C-FIND for the plugin, one per REST call for the gateway:
 * request/response turns counted by the link, the plugin's A-ASSOCIATE and A-RELEASE left out as they
 * are outside a query's latency) and its bytes / bandwidth. Across the link, 20 queries also run with one
 * association each (a findscu per query, as a modality that opens an association per query): the time per
 * association, where the plugin's association set-up and release cross the link too.
 *
 * Usage: npx bun scripts/bench-find.ts [--rounds N] [--studies N] [--warmup N] [--kinds study,study-plain,series,study-list] [--json] [--rtt MS [--mbit N]]
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import dcmjs from "dcmjs";
import { encodeDataset, type OutElement } from "../src/dicom/identifier.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { startTestGateway } from "../test/helpers/gateway.ts";
import { freePort, mean, median, startGatewayProcess, timed, wanFromArgs, type GatewayChild } from "./bench-lib.ts";
import { startOrthanc } from "./orthanc-testbed.ts";

const CT_FILE = "/usr/lib/python3/dist-packages/pydicom/data/test_files/CT_small.dcm";
const ROOT = "1.2.826.0.1.3680043.10.1197.9";
const EXPLICIT_LE = "1.2.840.10008.1.2.1";

function arg(name: string, dflt: number): number {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : dflt;
}
const ROUNDS = arg("--rounds", 3);
const STUDIES = arg("--studies", 100);
const WARMUP = arg("--warmup", 10);
const ALL_KINDS = ["study", "study-plain", "series", "study-list"] as const;
/** Queries per association, by kind. */
const QUERIES: Record<(typeof ALL_KINDS)[number], number> = { study: 100, "study-plain": 100, series: 100, "study-list": 20 };
type Kind = (typeof ALL_KINDS)[number];
const kindsArg = process.argv.indexOf("--kinds");
const KINDS: Kind[] = kindsArg >= 0 ? (process.argv[kindsArg + 1]!.split(",").filter((k) => (ALL_KINDS as readonly string[]).includes(k)) as Kind[]) : [...ALL_KINDS];
const JSON_OUT = process.argv.includes("--json");
const wan = wanFromArgs();
/** Round trips of a findscu association outside its queries: TCP's handshake, A-ASSOCIATE, A-RELEASE (PS3.8 7.1, 7.2). */
const ASSOCIATION_ROUND_TRIPS = 3;
const log = (s: string) => {
  if (!JSON_OUT) process.stdout.write(s + "\n");
};

(dcmjs as unknown as { log: { setLevel(l: string): void } }).log.setLevel("error");
const { DicomMessage, DicomMetaDictionary } = (dcmjs as unknown as { data: { DicomMessage: any; DicomMetaDictionary: any } }).data;

/** One instance per series, two series per study, one study per patient. */
function makeInstance(p: number, s: number): Uint8Array {
  const src = readFileSync(CT_FILE);
  const dict = DicomMessage.readFile(src.buffer.slice(src.byteOffset, src.byteOffset + src.byteLength));
  const ds = DicomMetaDictionary.naturalizeDataset(dict.dict);
  const sop = `${ROOT}.${p}.${s}.1`;
  Object.assign(ds, {
    PatientID: `BENCH${String(p).padStart(4, "0")}`,
    PatientName: `Bench^Patient${p}`,
    StudyInstanceUID: `${ROOT}.${p}`,
    StudyDate: `2021${String((p % 12) + 1).padStart(2, "0")}15`,
    AccessionNumber: `BACC${p}`,
    StudyDescription: `bench study ${p}`,
    SeriesInstanceUID: `${ROOT}.${p}.${s}`,
    SeriesNumber: s,
    SeriesDescription: `series ${s}`,
    Modality: s === 1 ? "CT" : "SR",
    SOPInstanceUID: sop,
  });
  delete ds.OtherPatientIDs;
  delete ds.OtherPatientIDsSequence;
  dict.dict = DicomMetaDictionary.denaturalizeDataset(ds);
  dict.meta["00020003"] = { vr: "UI", Value: [sop] };
  return new Uint8Array(dict.write());
}

async function load(url: string): Promise<void> {
  const orthanc = new OrthancClient({ url });
  const studies = new Set<string>();
  const queue: Array<[number, number]> = [];
  for (let p = 1; p <= STUDIES; p++) for (let s = 1; s <= 2; s++) queue.push([p, s]);
  const worker = async () => {
    for (let job = queue.shift(); job; job = queue.shift()) {
      const r = await orthanc.postJson<{ ID: string; ParentSeries: string; ParentStudy: string }>("/instances", makeInstance(job[0], job[1]));
      await orthanc.put(`/instances/${r.ID}/labels/bench`);
      await orthanc.put(`/series/${r.ParentSeries}/labels/bench`);
      studies.add(r.ParentStudy);
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
  for (const s of studies) await orthanc.put(`/studies/${s}/labels/bench`);
}

const el = (tag: number, vr: string, text = ""): OutElement => ({ tag, vr, text });

/** A STUDY query for patient `p`, or for every patient when `p` is undefined. */
function studyQuery(p: number | undefined, computed = true): Uint8Array {
  return encodeDataset(
    [
      el(0x00080052, "CS", "STUDY"),
      el(0x00100010, "PN"),
      el(0x00100020, "LO", p === undefined ? "" : `BENCH${String(p).padStart(4, "0")}`),
      el(0x00100030, "DA"),
      el(0x00080020, "DA"),
      el(0x00080030, "TM"),
      el(0x00080050, "SH"),
      el(0x00081030, "LO"),
      el(0x0020000d, "UI"),
      ...(computed ? [el(0x00080061, "CS"), el(0x00201208, "IS")] : []),
    ],
    EXPLICIT_LE,
    ["ISO_IR 100"],
  )!;
}

function seriesQuery(p: number): Uint8Array {
  return encodeDataset(
    [
      el(0x00080052, "CS", "SERIES"),
      el(0x0020000d, "UI", `${ROOT}.${p}`),
      el(0x0020000e, "UI"),
      el(0x00080060, "CS"),
      el(0x00200011, "IS"),
      el(0x0008103e, "LO"),
      el(0x00201209, "IS"),
    ],
    EXPLICIT_LE,
    ["ISO_IR 100"],
  )!;
}

/**
 * Runs findscu with the query files on one association; returns per-query latencies in ms, and the
 * association's own time (findscu's log: from requesting the association to its last line, released).
 */
async function findscu(port: number, aet: string, files: string[], logConfig: string): Promise<{ latencies: number[]; responses: number; failures: number; associationMs: number }> {
  const { code, output: out } = await timed("findscu", ["-lc", logConfig, "-S", "-aet", "BENCHSCU", "-aec", aet, "127.0.0.1", String(port), ...files]);
  if (code !== 0) throw new Error(`findscu exited ${code}:\n${out.slice(-2000)}`);
  const latencies: number[] = [];
  let first: number | undefined;
  let last = 0;
  let sent: number | undefined;
  let responses = 0;
  let failures = 0;
  for (const line of out.split("\n")) {
    const m = /^(\d\d):(\d\d):(\d\d)\.(\d+)\.(\d+) (.*)$/.exec(line);
    if (!m) continue;
    const t = ((Number(m[1]) * 60 + Number(m[2])) * 60 + Number(m[3])) * 1000 + Number(m[4]) + Number(m[5]) / 1000;
    const msg = m[6]!;
    if (msg.startsWith("Requesting Association")) first ??= t;
    last = t;
    if (msg.startsWith("Sending Find Request")) sent = t;
    else if (msg.startsWith("Find Response:")) responses++;
    else if (msg.startsWith("Received Final Find Response") && sent !== undefined) {
      latencies.push(t - sent);
      if (!msg.includes("(Success)")) failures++;
      sent = undefined;
    }
  }
  return { latencies, responses, failures, associationMs: first === undefined ? NaN : last - first };
}

/** The gateway's C-FIND operation time so far (the histogram's sum and count in /metrics). */
async function findSeconds(httpUrl: string): Promise<{ sum: number; count: number }> {
  const text = await (await fetch(httpUrl + "/metrics")).text();
  const value = (name: string) => Number(new RegExp(`^${name}\\{tenant="GATEWAY",service="C-FIND"\\} (\\S+)$`, "m").exec(text)?.[1] ?? 0);
  return { sum: value("dicom_gateway_dimse_operation_duration_seconds_sum"), count: value("dicom_gateway_dimse_operation_duration_seconds_count") };
}

const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
};

async function main(): Promise<void> {
  const pluginPort = await freePort();
  log(`starting Orthanc with the MultitenantDicom plugin (tenant PLUGIN on port ${pluginPort})...`);
  const orthanc = await startOrthanc({
    multitenant: { servers: [{ AET: "PLUGIN", Port: pluginPort, Labels: ["bench"] }] },
    extraConfig: { DicomAlwaysAllowFind: true, DicomAlwaysAllowEcho: true },
  });
  const dir = mkdtempSync(join(tmpdir(), "bench-find-"));
  // With --rtt: the site (findscu, the gateway) reaches the data centre (the plugin, Orthanc's REST API) across the link.
  const pluginDicomPort = wan ? (await wan.link(pluginPort)).port : pluginPort;
  const orthancUrl = wan ? (await wan.link(orthanc.httpPort)).url : orthanc.url;
  if (wan) log(`across ${wan.describe()}: findscu -> plugin, gateway -> Orthanc REST`);
  let recorder: Awaited<ReturnType<typeof startTestGateway>> | undefined;
  let gw: GatewayChild | undefined;
  try {
    log(`Orthanc ${orthanc.version} at ${orthanc.url}; loading ${STUDIES} patients x 1 study x 2 series...`);
    const t0 = performance.now();
    await load(orthanc.url);
    log(`loaded in ${((performance.now() - t0) / 1000).toFixed(1)} s`);

    const logConfig = join(dir, "log.cfg");
    writeFileSync(
      logConfig,
      [
        "log4cplus.rootLogger = INFO, console",
        "log4cplus.appender.console = log4cplus::ConsoleAppender",
        "log4cplus.appender.console.layout = log4cplus::PatternLayout",
        "log4cplus.appender.console.layout.ConversionPattern = %D{%H:%M:%S.%Q} %m%n",
      ].join("\n"),
    );
    const files: Record<Kind, string[]> = { study: [], "study-plain": [], series: [], "study-list": [] };
    for (const kind of KINDS) {
      for (let p = 1; p <= QUERIES[kind]; p++) {
        const n = ((p - 1) % STUDIES) + 1;
        const f = join(dir, `${kind}-${p}.dcm`);
        writeFileSync(f, kind === "series" ? seriesQuery(n) : kind === "study-list" ? studyQuery(undefined) : studyQuery(n, kind === "study"));
        files[kind].push(f);
      }
    }

    // The gateway's own /tools/find requests, recorded through an in-process gateway with the same
    // tenant, are replayed alone afterwards: what Orthanc's REST API costs per query, before any DICOM.
    const sent: Record<string, unknown[]> = {};
    recorder = await startTestGateway([{ AET: "GATEWAY", Labels: ["bench"] }], orthanc.url);
    // Recorded on the node's client: a C-FIND's calls go to one node pinned for it (orthanc/nodes.ts).
    let recording: string | undefined;
    for (const node of recorder.orthanc.nodes) {
      const client = node.client as unknown as { postJson: (path: string, body: unknown, opts?: unknown) => Promise<unknown> };
      const postJson = client.postJson.bind(client);
      client.postJson = (path, body, opts) => {
        if (recording && path === "/tools/find") (sent[recording] ??= []).push(body);
        return postJson(path, body, opts);
      };
    }
    for (const kind of KINDS) {
      recording = kind;
      await findscu(recorder.portOf("GATEWAY"), "GATEWAY", files[kind], logConfig);
    }
    recording = undefined;
    for (const kind of KINDS) if (!sent[kind]?.length) throw new Error(`no /tools/find request of the gateway was recorded for ${kind}: the replay would measure nothing`);
    await recorder.stop();
    recorder = undefined;

    const gatewayPort = await freePort();
    gw = await startGatewayProcess(
      {
        MultitenantDicom: { Servers: [{ AET: "GATEWAY", Port: gatewayPort, Labels: ["bench"] }] },
        Gateway: {
          Orthanc: { Url: orthancUrl },
          Http: { Host: "127.0.0.1", Port: await freePort() },
          SpoolDirectory: mkdtempSync(join(tmpdir(), "bench-find-spool-")),
          Log: { Level: "warn", Format: "json" },
        },
      },
      { readyWhenEchoes: { aet: "GATEWAY", port: gatewayPort } },
    );
    const targets = [
      { name: "plugin", port: pluginDicomPort, aet: "PLUGIN" },
      { name: "gateway", port: gatewayPort, aet: "GATEWAY" },
    ];
    // Warm-up, not measured: connections, Orthanc's caches, the gateway's JIT.
    for (const t of targets) for (const kind of KINDS) for (let i = 0; i < WARMUP; i++) await findscu(t.port, t.aet, files[kind], logConfig);

    const results: Record<
      string,
      Record<string, { latencies: number[]; responses: number; failures: number; wallMs: number[]; peerShareMs: number[]; roundTripsPerQuery: number[]; bytesPerQuery: number[] }>
    > = {};
    for (let round = 0; round < ROUNDS; round++) {
      for (const kind of KINDS) {
        const order = round % 2 === 0 ? targets : [...targets].reverse();
        for (const t of order) {
          const before = t.name === "gateway" ? await findSeconds(gw.httpUrl) : undefined;
          const mark = wan?.mark();
          const started = performance.now();
          const r = await findscu(t.port, t.aet, files[kind], logConfig);
          const wall = performance.now() - started;
          const acc = ((results[kind] ??= {})[t.name] ??= { latencies: [], responses: 0, failures: 0, wallMs: [], peerShareMs: [], roundTripsPerQuery: [], bytesPerQuery: [] });
          if (mark) {
            const f = wan!.floors(mark);
            const outside = t.name === "plugin" ? ASSOCIATION_ROUND_TRIPS : 0;
            acc.roundTripsPerQuery.push((f.roundTrips - outside) / r.latencies.length);
            acc.bytesPerQuery.push(f.bytes / r.latencies.length);
          }
          acc.latencies.push(...r.latencies);
          acc.responses += r.responses;
          acc.failures += r.failures;
          acc.wallMs.push(wall);
          if (before) {
            // findscu's share: its latency minus the gateway's own time per operation (mean over the association).
            const after = await findSeconds(gw.httpUrl);
            const ownMs = ((after.sum - before.sum) / (after.count - before.count)) * 1000;
            acc.peerShareMs.push(mean(r.latencies) - ownMs);
          }
        }
      }
    }

    // Orthanc alone: the recorded requests through the gateway's own client (keep-alive HTTP/1.1).
    const restAlone: Record<string, number> = {};
    const replay = new OrthancClient({ url: orthancUrl });
    for (const kind of KINDS) {
      const lat: number[] = [];
      for (let round = 0; round < ROUNDS; round++) {
        for (const body of sent[kind] ?? []) {
          const t0 = performance.now();
          await replay.postJson("/tools/find", body as object);
          lat.push(performance.now() - t0);
        }
      }
      restAlone[kind] = median(lat);
    }
    replay.close();

    const summary: Record<string, unknown> = { orthanc: orthanc.version, rounds: ROUNDS, queriesPerAssociation: QUERIES };
    log("");
    log(`C-FIND latency per query (findscu timestamps), ${ROUNDS} rounds, the queries of a kind on one association:`);
    log("study: one patient's study, with ModalitiesInStudy + NumberOfStudyRelatedInstances (the plugin leaves them out); study-plain: without;");
    log(`series: one study's series; study-list: all ${STUDIES} studies, with the computed keys (20 queries)`);
    log("level        target    median ms   p90 ms   queries  responses  failures  association s (median)");
    for (const kind of KINDS) {
      for (const t of targets) {
        const r = results[kind]![t.name]!;
        const row = {
          medianMs: median(r.latencies),
          p90Ms: pct(r.latencies, 90),
          queries: r.latencies.length,
          responses: r.responses,
          failures: r.failures,
          associationSeconds: median(r.wallMs) / 1000,
        };
        summary[`${kind}.${t.name}`] = row;
        log(
          `${kind.padEnd(12)} ${t.name.padEnd(9)} ${row.medianMs.toFixed(3).padStart(9)} ${row.p90Ms.toFixed(3).padStart(8)} ${String(row.queries).padStart(9)} ${String(row.responses).padStart(10)} ${String(row.failures).padStart(9)} ${row.associationSeconds.toFixed(3).padStart(12)}`,
        );
      }
      const ratio = median(results[kind]!.gateway!.latencies) / median(results[kind]!.plugin!.latencies);
      summary[`${kind}.ratio`] = ratio;
      log(`${kind.padEnd(12)} gateway/plugin median ratio: ${ratio.toFixed(2)} ${ratio <= 1 ? "(target met: <= 1)" : "(target missed: > 1)"}`);
      const pluginMs = median(results[kind]!.plugin!.latencies);
      const peerShare = median(results[kind]!.gateway!.peerShareMs);
      const floor = peerShare + restAlone[kind]!;
      Object.assign(summary, { [`${kind}.orthancRestAloneMs`]: restAlone[kind], [`${kind}.findscuShareMs`]: peerShare, [`${kind}.floorMs`]: floor, [`${kind}.floorRatio`]: floor / pluginMs });
      log(`${kind.padEnd(12)}   Orthanc's /tools/find answer alone (the gateway's requests replayed): ${restAlone[kind]!.toFixed(3)} ms = ${(restAlone[kind]! / pluginMs).toFixed(2)} of the plugin's query`);
      log(`${kind.padEnd(12)}   findscu's own share (gateway latency - gateway time per operation): ${peerShare.toFixed(3)} ms`);
      log(`${kind.padEnd(12)}   floor of a gateway over REST that did no work at all (sum): ${floor.toFixed(3)} ms = ${(floor / pluginMs).toFixed(2)} of the plugin's query`);
      if (wan) {
        for (const t of targets) {
          const r = results[kind]![t.name]!;
          const trips = median(r.roundTripsPerQuery);
          const bytes = median(r.bytesPerQuery);
          const tripsMs = trips * wan.rttMs;
          const bandwidthMs = (bytes / ((wan.mbit * 1e6) / 8)) * 1000;
          Object.assign(summary, { [`${kind}.${t.name}.roundTripsPerQuery`]: trips, [`${kind}.${t.name}.bytesPerQuery`]: bytes });
          log(
            `${kind.padEnd(12)}   floors over the link per query, ${t.name.padEnd(7)}: round trips x RTT ${trips.toFixed(2)} x ${wan.rttMs} ms = ${tripsMs.toFixed(1)} ms, bytes / bandwidth ${(bytes / 1e3).toFixed(1)} kB = ${bandwidthMs.toFixed(2)} ms`,
          );
        }
      }
    }
    if (wan) {
      // The setup: a modality opens one association per query (a findscu per query), so the plugin
      // pays TCP's handshake, A-ASSOCIATE and A-RELEASE across the link each time; the gateway answers them
      // at the site and crosses the link once, for Orthanc's /tools/find.
      const kind = KINDS.includes("study-plain") ? "study-plain" : KINDS[0]!;
      const queries = files[kind].slice(0, 20);
      const per: Record<string, { wallMs: number[]; associationMs: number[]; roundTrips: number[] }> = {};
      for (let round = 0; round < ROUNDS; round++) {
        for (const t of round % 2 === 0 ? targets : [...targets].reverse()) {
          const acc = (per[t.name] ??= { wallMs: [], associationMs: [], roundTrips: [] });
          for (const q of queries) {
            const mark = wan.mark();
            const started = performance.now();
            const r = await findscu(t.port, t.aet, [q], logConfig);
            acc.wallMs.push(performance.now() - started);
            acc.associationMs.push(r.associationMs);
            acc.roundTrips.push(wan.floors(mark).roundTrips);
          }
        }
      }
      log("");
      log(`${queries.length} C-FIND (${kind}), one association each (a findscu per query), ${ROUNDS} rounds:`);
      log("  the association (findscu's log: association requested -> released), and findscu's whole run (process start to exit)");
      const range = (xs: number[]) => `${Math.min(...xs).toFixed(1)}-${Math.max(...xs).toFixed(1)}`;
      for (const t of targets) {
        const r = per[t.name]!;
        const trips = median(r.roundTrips);
        summary[`oneEach.${t.name}`] = { associationMs: median(r.associationMs), wallMs: median(r.wallMs), roundTrips: trips };
        log(
          `  ${t.name.padEnd(8)} association ${median(r.associationMs).toFixed(1)} ms (${range(r.associationMs)}), run ${median(r.wallMs).toFixed(1)} ms (${range(r.wallMs)}); floor: round trips x RTT ${trips} x ${wan.rttMs} ms = ${(trips * wan.rttMs).toFixed(0)} ms`,
        );
      }
      const ratio = median(per.gateway!.associationMs) / median(per.plugin!.associationMs);
      const wallRatio = median(per.gateway!.wallMs) / median(per.plugin!.wallMs);
      Object.assign(summary, { "oneEach.ratio": ratio, "oneEach.wallRatio": wallRatio });
      log(`  gateway/plugin: association ${ratio.toFixed(2)}, whole run ${wallRatio.toFixed(2)}`);
    }
    if (JSON_OUT) process.stdout.write(JSON.stringify(summary, null, 2) + "\n");
  } finally {
    await recorder?.stop();
    await gw?.stop();
    await orthanc.stop();
    await wan?.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e) => {
  process.stderr.write(`${(e as Error).stack ?? e}\n`);
  process.exit(1);
});
