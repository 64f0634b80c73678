/**
 * C-MOVE benchmark: Orthanc's MultitenantDicom plugin vs the gateway, same Orthanc, same data, same
 * destination, one run.   npm run bench:move   (npx bun scripts/bench-move.ts [--rounds 3])
 *
 * 1. The 500-instance set (a real CT slice, 5 patients × 2 studies × 2 series × 25, unique UIDs) is
 *    uploaded to one Orthanc running the MultitenantDicom plugin, labeled "bench" on studies, series
 *    and instances (what both would have stored with the default LabelsStoreLevels).
 * 2. A dcmtk storescp is the move destination (DicomModalities "dest") of the plugin and of the
 *    gateway (a child process: bun src/cli.ts serve), each with one tenant labeled "bench".
 * 3. Each round moves the 10 studies, one movescu (Study Root, STUDY level) after the other, first
 *    through the plugin, then through the gateway; the destination must receive all 500 instances.
 *    Times: the whole round (10 moves), and per move the time from movescu's start to the first
 *    C-STORE storescp reports (time to first sub-operation).
 * 4. One ~1 GiB instance (the CT slice's attributes, 2048 frames of 512×512) is uploaded and labeled,
 *    then moved to storescp through the plugin and through the gateway, and fetched with C-GET (getscu)
 *    through the gateway: times, MB/s, and the gateway's peak resident memory (VmHWM) after each.
 *    `--no-large` skips it.
 * `--rtt MS --mbit N` (issue 18): the site (movescu, the destination, the gateway) and the data centre
 * (Orthanc, its plugin) are joined by an emulated WAN link (scripts/link-emulator.ts): movescu reaches the
 * plugin across it and the plugin dials the destination across it; the gateway reaches Orthanc's REST
 * API across it. Each row then also prints the floors of its traffic over the link: bytes / bandwidth
 * and round trips × RTT (one per C-STORE sub-operation for the plugin, which waits for each response, one
 * per REST call for the gateway; request/response turns that did not overlap, counted by the link, a
 * new TCP connection's handshake included).
 * Every dcmtk process runs with TCP_NODELAY=1.
 * Env: BENCH_PARALLELISM=N sets the gateway's Gateway.Move.Parallelism; BENCH_DEBUG=1 prints movescu's
 * output for moves that delivered nothing.
 */
import { createReadStream, mkdtempSync, readdirSync, rmSync, statSync } from "node:fs";
import { Readable } from "node:stream";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  floorCells,
  freePort,
  makeLargeInstance,
  mean,
  median,
  medianFloors,
  REPO,
  startGatewayProcess,
  startStorescp,
  table,
  timed,
  verdict,
  wanFromArgs,
  type BenchStorescp,
  type Floors,
  type GatewayChild,
} from "./bench-lib.ts";
import { generateDataset, type GeneratedDataset } from "./generate-dataset.ts";
import { startOrthanc, type OrthancHandle } from "./orthanc-testbed.ts";

const LABEL = "bench";
const wan = wanFromArgs();

async function upload(o: OrthancHandle, data: GeneratedDataset): Promise<void> {
  const { readFile } = await import("node:fs/promises");
  const queue = [...data.instances];
  const parents = { studies: new Set<string>(), series: new Set<string>(), instances: new Set<string>() };
  await Promise.all(
    Array.from({ length: 8 }, async () => {
      for (let i = queue.shift(); i; i = queue.shift()) {
        const res = await fetch(`${o.url}/instances`, { method: "POST", body: await readFile(i.path) });
        if (!res.ok) throw new Error(`upload of ${i.path} failed: ${res.status} ${await res.text()}`);
        const r = (await res.json()) as { ID: string; ParentSeries: string; ParentStudy: string };
        parents.studies.add(r.ParentStudy);
        parents.series.add(r.ParentSeries);
        parents.instances.add(r.ID);
      }
    }),
  );
  const puts: string[] = [
    ...[...parents.studies].map((id) => `/studies/${id}/labels/${LABEL}`),
    ...[...parents.series].map((id) => `/series/${id}/labels/${LABEL}`),
    ...[...parents.instances].map((id) => `/instances/${id}/labels/${LABEL}`),
  ];
  await Promise.all(
    Array.from({ length: 8 }, async () => {
      for (let p = puts.shift(); p; p = puts.shift()) await fetch(o.url + p, { method: "PUT", body: "" }).then((r) => r.body?.cancel());
    }),
  );
}

interface RoundResult {
  seconds: number;
  firstSubOp: number[];
  received: number;
  failures: string[];
  /** With --rtt: the floors of the round's traffic over the link. */
  floors?: Floors;
}

/** Moves the studies one after the other through `aet` on `port`; times the round and each first sub-operation. */
async function moveRound(aet: string, port: number, dest: BenchStorescp, data: GeneratedDataset): Promise<RoundResult> {
  dest.clear();
  const firstSubOp: number[] = [];
  const failures: string[] = [];
  const mark = wan?.mark();
  const t0 = performance.now();
  for (const study of data.studies) {
    const before = dest.stores.length;
    if (process.env.BENCH_DEBUG) process.stderr.write(`move ${aet} ${study.studyInstanceUid}\n`);
    const r = await timed("movescu", ["-S", ...(process.env.BENCH_DEBUG ? ["-v"] : []), "-aet", "BENCHSCU", "-aec", aet, "-aem", dest.aet, "-k", "QueryRetrieveLevel=STUDY", "-k", `StudyInstanceUID=${study.studyInstanceUid}`, "127.0.0.1", String(port)]);
    if (process.env.BENCH_DEBUG && before === dest.stores.length) process.stderr.write(r.output + "\n");
    if (r.code !== 0) failures.push(`movescu exited ${r.code}: ${r.output.trim().split("\n").slice(-3).join(" | ")}`);
    const first = dest.stores[before];
    if (first !== undefined) firstSubOp.push((first - r.startedAt) / 1000);
  }
  const seconds = (performance.now() - t0) / 1000;
  const floors = mark && wan!.floors(mark);
  // storescp may still be writing the last file when movescu returns.
  for (let i = 0; i < 100 && dest.files() < data.instances.length; i++) await new Promise((r) => setTimeout(r, 20));
  return { seconds, firstSubOp, received: dest.files(), failures, floors };
}

const ms = (s: number) => `${(s * 1000).toFixed(1)} ms`;

/** Uploads one large file to Orthanc as a stream and labels it at every level; returns its Study Instance UID. */
async function uploadLarge(o: OrthancHandle, path: string): Promise<string> {
  const body = Readable.toWeb(createReadStream(path, { highWaterMark: 1 << 20 })) as unknown as BodyInit;
  const res = await fetch(`${o.url}/instances`, { method: "POST", body, headers: { "Content-Length": String(statSync(path).size) }, duplex: "half" } as RequestInit);
  if (!res.ok) throw new Error(`upload of the large instance failed: ${res.status} ${await res.text()}`);
  const r = (await res.json()) as { ID: string; ParentSeries: string; ParentStudy: string };
  for (const p of [`/studies/${r.ParentStudy}`, `/series/${r.ParentSeries}`, `/instances/${r.ID}`]) await fetch(`${o.url}${p}/labels/${LABEL}`, { method: "PUT", body: "" });
  const study = (await (await fetch(`${o.url}/studies/${r.ParentStudy}`)).json()) as { MainDicomTags: { StudyInstanceUID: string } };
  return study.MainDicomTags.StudyInstanceUID;
}

/** One C-MOVE (or, with getscu, C-GET) of a study; seconds and whether it succeeded. */
async function retrieveOnce(tool: "movescu" | "getscu", aet: string, port: number, study: string, extra: string[]): Promise<{ seconds: number; ok: boolean; output: string }> {
  const t0 = performance.now();
  const r = await timed(tool, ["-S", "-aet", "BENCHSCU", "-aec", aet, ...extra, "-k", "QueryRetrieveLevel=STUDY", "-k", `StudyInstanceUID=${study}`, "127.0.0.1", String(port)]);
  return { seconds: (performance.now() - t0) / 1000, ok: r.code === 0, output: r.output };
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const rounds = args.includes("--rounds") ? Number(args[args.indexOf("--rounds") + 1]) || 5 : 5;
  const log = (s: string) => process.stdout.write(s + "\n");

  const data = await generateDataset({ outDir: join(REPO, ".cache", "bench-dataset-500"), patients: 5, studiesPerPatient: 2, seriesPerStudy: 2, instancesPerSeries: 25 });
  log(`data set: ${data.instances.length} instances in ${data.studies.length} studies (from CT_small.dcm)`);

  const dest = await startStorescp({ aet: "DEST", storeTimes: true });
  const [pluginPort] = [await freePort()];
  // With --rtt: movescu reaches the plugin, and the plugin the destination (a connection opened from the far side), across the link.
  const pluginDicomPort = wan ? (await wan.link(pluginPort)).port : pluginPort;
  const destPortForPlugin = wan ? (await wan.link(dest.port, "far")).port : dest.port;
  const orthanc = await startOrthanc({
    multitenant: { servers: [{ AET: "PLUGIN", Port: pluginPort, Labels: [LABEL], LabelsConstraint: "All" }] },
    // The plugin only serves C-MOVE to callers listed in DicomModalities (DicomAlwaysAllowMove is false).
    dicomModalities: { dest: [dest.aet, "127.0.0.1", destPortForPlugin], bench: ["BENCHSCU", "127.0.0.1", 4242] },
    log: () => {},
  });
  let gateway: GatewayChild | undefined;
  try {
    log(`Orthanc ${orthanc.version} with the MultitenantDicom plugin (tenant PLUGIN on port ${pluginPort})`);
    if (wan) log(`across ${wan.describe()}: movescu -> plugin -> destination, gateway -> Orthanc REST`);
    // A data set left by an earlier run on the same cache is fine: Orthanc's storage is new each run.
    const t0 = performance.now();
    await upload(orthanc, data);
    log(`uploaded and labeled in ${((performance.now() - t0) / 1000).toFixed(1)} s`);

    const gatewayPort = await freePort();
    const httpPort = await freePort();
    gateway = await startGatewayProcess({
      MultitenantDicom: { Servers: [{ AET: "GATEWAY", Port: gatewayPort, Labels: [LABEL], LabelsConstraint: "All" }] },
      DicomModalities: { dest: [dest.aet, "127.0.0.1", dest.port] },
      Gateway: {
        Orthanc: { Url: wan ? (await wan.link(orthanc.httpPort)).url : orthanc.url },
        Http: { Host: "127.0.0.1", Port: httpPort },
        SpoolDirectory: mkdtempSync(join(tmpdir(), "gw-bench-move-spool-")),
        Log: { Level: "warn", Format: "json" },
        ...(process.env.BENCH_PARALLELISM ? { Move: { Parallelism: Number(process.env.BENCH_PARALLELISM) } } : {}),
      },
    }, { readyWhenEchoes: { aet: "GATEWAY", port: gatewayPort } });
    log(`gateway (bun ${process.versions.bun ?? process.version}) tenant GATEWAY on port ${gatewayPort}`);

    // Warm-up: one study each (caches, keep-alive connections, JIT).
    await moveRound("PLUGIN", pluginDicomPort, dest, { ...data, studies: data.studies.slice(0, 1), instances: data.instances.slice(0, 100) });
    await moveRound("GATEWAY", gatewayPort, dest, { ...data, studies: data.studies.slice(0, 1), instances: data.instances.slice(0, 100) });

    // Rounds alternate which goes first, so that a burst of load on the machine hits both alike.
    const results: Record<"plugin" | "gateway", RoundResult[]> = { plugin: [], gateway: [] };
    for (let r = 0; r < rounds; r++) {
      const order: ["plugin" | "gateway", string, number][] = [
        ["plugin", "PLUGIN", pluginDicomPort],
        ["gateway", "GATEWAY", gatewayPort],
      ];
      if (r % 2) order.reverse();
      for (const [name, aet, port] of order) results[name].push(await moveRound(aet, port, dest, data));
    }
    const metrics = await (await fetch(`${gateway.httpUrl}/metrics`)).text();
    const metric = (name: string) =>
      [...metrics.matchAll(new RegExp(`^${name}\\{[^}]*tenant="GATEWAY"[^}]*\\} ([0-9.e+-]+)$`, "gm"))].reduce((n, m) => n + Number(m[1]), 0);

    const summary = (name: string, rs: RoundResult[]) => {
      const totals = rs.map((r) => r.seconds);
      const firsts = rs.flatMap((r) => r.firstSubOp);
      const floors = wan ? medianFloors(rs.map((r) => r.floors!)) : undefined;
      return { name, total: median(totals), totals, firstMedian: median(firsts), firstMean: mean(firsts), firstMax: Math.max(...firsts), received: rs.map((r) => r.received), failures: rs.flatMap((r) => r.failures), floors };
    };
    const p = summary("plugin", results.plugin);
    const g = summary("gateway", results.gateway);
    log("");
    log(`moving ${data.studies.length} studies (${data.instances.length} instances), ${rounds} rounds, one C-MOVE per study:`);
    const rows = [
      ["", "total (median)", "rounds", "first sub-op (median)", "mean", "max", "received per round", ...(wan ? ["floor: bytes / bandwidth s", "floor: round trips x RTT s"] : [])],
      ...[p, g].map((x) => [
        x.name,
        `${x.total.toFixed(2)} s`,
        x.totals.map((t) => t.toFixed(2)).join(" / "),
        ms(x.firstMedian),
        ms(x.firstMean),
        ms(x.firstMax),
        x.received.join(" / "),
        ...(wan ? floorCells(x.floors, wan.rttMs) : []),
      ]),
    ];
    log(table(rows));
    log("");
    log(`gateway / plugin, total time:               ${(g.total / p.total).toFixed(2)} (target <= 1: ${verdict(g.total <= p.total)})`);
    log(`gateway / plugin, time to first sub-op:     ${(g.firstMedian / p.firstMedian).toFixed(2)}`);
    const moves = metric("dicom_gateway_retrieve_duration_seconds_count");
    log(
      `inside the gateway (its /metrics, all ${moves} moves incl. warm-up): C-MOVE request to final response ${ms(metric("dicom_gateway_retrieve_duration_seconds_sum") / moves)} mean, ` +
        `to the first sub-operation ${ms(metric("dicom_gateway_retrieve_first_suboperation_seconds_sum") / moves)} mean (identifier, label-scoped lookup in Orthanc, first download and destination association)`,
    );
    log(`throughput: plugin ${(data.instances.length / p.total).toFixed(0)} instances/s, gateway ${(data.instances.length / g.total).toFixed(0)} instances/s`);
    const complete = [...p.received, ...g.received].every((n) => n === data.instances.length);
    log(`every round delivered all ${data.instances.length} instances: ${complete ? "yes" : "NO"}`);
    for (const f of [...p.failures.map((x) => `plugin: ${x}`), ...g.failures.map((x) => `gateway: ${x}`)]) log(`  ${f}`);
    if (!complete || p.failures.length + g.failures.length > 0) process.exitCode = 1;

    if (!args.includes("--no-large")) {
      const big = makeLargeInstance();
      const mb = big.bytes / 1e6;
      const study = await uploadLarge(orthanc, big.path);
      rmSync(big.path, { force: true });
      log("");
      log(`one ${(big.bytes / 2 ** 30).toFixed(2)} GiB instance (uploaded and labeled), gateway peak RSS (VmHWM) before: ${gateway.peakRssMiB().toFixed(0)} MiB`);
      const received = () => readdirSync(dest.dir).reduce((n, f) => n + statSync(join(dest.dir, f)).size, 0);
      const rows: string[][] = [["", "seconds", "MB/s", "received", "gateway VmHWM after", ...(wan ? ["floor: bytes / bandwidth s", "floor: round trips x RTT s"] : [])]];
      for (const [name, aet, port] of [["plugin C-MOVE", "PLUGIN", pluginDicomPort], ["gateway C-MOVE", "GATEWAY", gatewayPort]] as const) {
        dest.clear();
        const mark = wan?.mark();
        const r = await retrieveOnce("movescu", aet, port, study, ["-aem", dest.aet]);
        const floors = wan ? floorCells(wan.floors(mark!), wan.rttMs) : [];
        const got = received();
        rows.push([name, r.seconds.toFixed(2), (mb / r.seconds).toFixed(0), `${(got / 2 ** 30).toFixed(2)} GiB`, name.startsWith("gateway") ? `${gateway.peakRssMiB().toFixed(0)} MiB` : "", ...floors]);
        if (!r.ok || got < big.bytes * 0.99) {
          log(`  ${name} failed:\n${r.output.slice(-1500)}`);
          process.exitCode = 1;
        }
      }
      dest.clear();
      const getDir = mkdtempSync(join(tmpdir(), "gw-bench-get-"));
      try {
        const mark = wan?.mark();
        const r = await retrieveOnce("getscu", "GATEWAY", gatewayPort, study, ["-od", getDir]);
        const floors = wan ? floorCells(wan.floors(mark!), wan.rttMs) : [];
        const got = readdirSync(getDir).reduce((n, f) => n + statSync(join(getDir, f)).size, 0);
        rows.push(["gateway C-GET", r.seconds.toFixed(2), (mb / r.seconds).toFixed(0), `${(got / 2 ** 30).toFixed(2)} GiB`, `${gateway.peakRssMiB().toFixed(0)} MiB`, ...floors]);
        if (!r.ok || got < big.bytes * 0.99) {
          log(`  gateway C-GET failed:\n${r.output.slice(-1500)}`);
          process.exitCode = 1;
        }
      } finally {
        rmSync(getDir, { recursive: true, force: true });
      }
      log(table(rows));
    }
  } finally {
    await gateway?.stop();
    await orthanc.stop();
    await dest.stop();
    await wan?.close();
  }
}

await main();
