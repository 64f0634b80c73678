/**
 * C-STORE benchmark: Orthanc's MultitenantDicom plugin vs the gateway (Spool and Sync) vs dcmtk storescp,
 * same machine, same Orthanc build, one run.   npm run bench:store
 *
 * 1. 500 distinct instances (a real CT slice, 5 patients × 2 studies × 2 series × 25) with one storescu
 *    association to each target; for Spool also the time until all 500 are in Orthanc with their labels.
 *    `--rounds N` (default 3) rounds, each target on a fresh Orthanc; medians, with the range.
 * 2. 4 parallel associations × 125 instances, plugin vs gateway Spool.
 * 3. One ~1 GiB instance into the gateway's spool: throughput and the gateway's peak RSS (VmHWM).
 *
 * Two reference rows show what Orthanc's REST API alone allows on this machine (the same 500 files,
 * read into memory first, POST /instances + the labels, no DICOM at all): with 4 parallel keep-alive
 * uploads (the bound of any end-to-end time through REST) and one at a time (with the storescp floor,
 * the bound of Sync, which acknowledges each instance only once Orthanc has stored and labeled it, while
 * storescu sends the next instance only after that answer).
 *
 * `--rtt MS --mbit N` (issue 18): the site and the data centre are apart, joined by an emulated WAN link
 * (scripts/link-emulator.ts): storescu reaches the plugin across it, the gateway (at the site, with
 * storescu and storescp) reaches Orthanc's REST API across it, and so do rows (e) and (f). Each row that
 * crosses the link also prints the floors of its traffic there: bytes / bandwidth, and round trips × RTT
 * (one per C-STORE for the plugin, as storescu waits for each response; one per REST call for the
 * gateway; counted by the link as request/response turns that did not overlap, a new TCP connection's
 * handshake included). Across the link two more gateway targets run: Isolation Shared (no Orthanc lookup
 * before each acknowledgement: what Strict's per-instance lookup costs) and Strict over HTTPS (the test
 * bed's nginx with client certificates in front of Orthanc, the link in front of nginx).
 * `--instances N` (a multiple of 20, default 500) and `--no-large` make short runs.
 */
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startOrthanc, startTlsProxy, type OrthancHandle, type TlsProxyHandle } from "./orthanc-testbed.ts";
import {
  floorCells,
  freePort,
  makeLargeInstance,
  median,
  medianFloors,
  REPO,
  startGatewayProcess,
  startStorescp,
  table,
  timed,
  until,
  verdict,
  wanFromArgs,
  type Floors,
  type GatewayChild,
} from "./bench-lib.ts";
import { generateDataset } from "./generate-dataset.ts";

const LABEL = "bench";
const wan = wanFromArgs();
const orthancs: OrthancHandle[] = [];
const gateways: GatewayChild[] = [];
const proxies: TlsProxyHandle[] = [];

async function orthanc(multitenant?: { AET: string; Port: number }): Promise<OrthancHandle> {
  const o = await startOrthanc(multitenant ? { multitenant: { servers: [{ ...multitenant, Labels: [LABEL] }] } } : {});
  orthancs.push(o);
  return o;
}

async function labeledCount(o: OrthancHandle): Promise<number> {
  const res = await fetch(o.url + "/tools/find", { method: "POST", body: JSON.stringify({ Level: "Instance", Query: {}, Labels: [LABEL], LabelsConstraint: "All" }) });
  return ((await res.json()) as string[]).length;
}

/** Labels must sit on Study, Series and Instance (the default LabelsStoreLevels) of every instance. */
async function checkLabels(o: OrthancHandle, expected: number): Promise<string> {
  const levels = await Promise.all(
    ["Study", "Series", "Instance"].map(async (Level) => {
      const res = await fetch(o.url + "/tools/find", { method: "POST", body: JSON.stringify({ Level, Query: {}, Labels: [LABEL] }) });
      return ((await res.json()) as string[]).length;
    }),
  );
  const want = [10, 20, expected];
  return levels.every((n, i) => n === want[i]) ? `ok (${levels.join("/")} studies/series/instances labeled)` : `WRONG: ${levels.join("/")} labeled, want ${want.join("/")}`;
}

/** Where the site reaches `o`'s REST API: across the link with --rtt. */
async function restUrl(o: OrthancHandle): Promise<string> {
  return wan ? (await wan.link(o.httpPort)).url : o.url;
}

/** Where the site reaches a DICOM port of the data centre: across the link with --rtt. */
async function dicomPort(port: number): Promise<number> {
  return wan ? (await wan.link(port)).port : port;
}

/** Orthanc's REST API alone: the files uploaded from memory and labeled (Study, Series, Instance), `parallel` at a time. */
async function restIngest(files: string[], parallel: number): Promise<{ seconds: number; cpu: number; labels: string; floors?: Floors }> {
  const o = await orthanc();
  const url = await restUrl(o);
  const bodies = files.map((f) => readFileSync(f));
  const labeled = new Set<string>();
  const label = async (path: string) => {
    const res = await fetch(`${url}${path}/labels/${LABEL}`, { method: "PUT" });
    await res.arrayBuffer();
    if (!res.ok) throw new Error(`PUT ${path}/labels: HTTP ${res.status}`);
  };
  let next = 0;
  const cpu0 = cpuSeconds();
  const mark = wan?.mark();
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: parallel }, async () => {
      while (next < bodies.length) {
        const res = await fetch(url + "/instances", { method: "POST", body: bodies[next++]! });
        if (!res.ok) throw new Error(`POST /instances: HTTP ${res.status}`);
        const a = (await res.json()) as { ID: string; ParentStudy: string; ParentSeries: string };
        const calls = [label(`/instances/${a.ID}`)];
        for (const p of [`/studies/${a.ParentStudy}`, `/series/${a.ParentSeries}`]) {
          if (!labeled.has(p)) {
            labeled.add(p);
            calls.push(label(p));
          }
        }
        await Promise.all(calls);
      }
    }),
  );
  const seconds = (performance.now() - t0) / 1000;
  const cpu = cpuSeconds() - cpu0;
  const floors = mark && wan!.floors(mark);
  return { seconds, cpu, labels: await checkLabels(o, files.length), floors };
}

function storescuArgs(aet: string, port: number, files: string[]): string[] {
  return ["-aet", "BENCHSCU", "-aec", aet, "127.0.0.1", String(port), ...files];
}

/** HTTPS in front of `o` (the test bed's nginx, client certificates required), reached across the link. */
async function tlsOrthanc(o: OrthancHandle): Promise<Record<string, unknown>> {
  const p = await startTlsProxy(o);
  proxies.push(p);
  const port = wan ? (await wan.link(p.port)).port : p.port;
  return { Url: `https://127.0.0.1:${port}`, Tls: { CA: p.caFile, Certificate: p.clientCertFile, Key: p.clientKeyFile } };
}

/** A gateway at the site: it reaches `o` across the link with --rtt (over HTTPS through nginx with `https`). */
async function gatewayConfig(o: OrthancHandle, tenants: Record<string, unknown>[], extra: Record<string, unknown> = {}, https = false): Promise<Record<string, unknown>> {
  return {
    MultitenantDicom: { Servers: tenants },
    Gateway: {
      Orthanc: https ? await tlsOrthanc(o) : { Url: await restUrl(o) },
      Http: { Host: "127.0.0.1", Port: 0 },
      SpoolDirectory: mkdtempSync(join(tmpdir(), "gw-bench-spool-")),
      Log: { Level: "info", Format: "json" },
    },
    ...extra,
  };
}

type Measured = "plugin" | "spoolAck" | "spoolE2e" | "sharedAck" | "sharedE2e" | "httpsAck" | "httpsE2e" | "sync" | "floor" | "restParallel" | "restSerial";

interface Round {
  plugin: number;
  spoolAck: number;
  spoolE2e: number;
  /** With --rtt only (NaN otherwise): Isolation Shared, and Strict over HTTPS through nginx. */
  sharedAck: number;
  sharedE2e: number;
  httpsAck: number;
  httpsE2e: number;
  sync: number;
  floor: number;
  restParallel: number;
  restSerial: number;
  /** CPU seconds of the whole machine during (d) and (e). */
  cpuFloor: number;
  cpuRestParallel: number;
  labels: Record<string, string>;
  /** With --rtt: the floors of each row's traffic over the link (none for rows that do not cross it). */
  floors: Partial<Record<Measured, Floors>>;
}

/** One round of the single-association comparison, every target on a fresh Orthanc. */
async function oneRound(files: string[]): Promise<Round> {
  const N = files.length;
  const started = orthancs.length;
  const labels: Record<string, string> = {};
  const floors: Round["floors"] = {};
  // (a) the plugin
  const pluginPort = await freePort();
  const oPlugin = await orthanc({ AET: "PLUGIN", Port: pluginPort });
  let mark = wan?.mark();
  const plugin = await timed("storescu", storescuArgs("PLUGIN", await dicomPort(pluginPort), files));
  if (mark) floors.plugin = wan!.floors(mark);
  if (plugin.code !== 0) throw new Error(`storescu to the plugin failed:\n${plugin.output.slice(-2000)}`);
  labels.plugin = await checkLabels(oPlugin, N);

  // (b) the gateway, Spool
  const oSpool = await orthanc();
  const spoolPort = await freePort();
  const gSpool = await startGatewayProcess(await gatewayConfig(oSpool, [{ AET: "SPOOL", Port: spoolPort, Labels: [LABEL] }]));
  gateways.push(gSpool);
  mark = wan?.mark();
  const t0 = performance.now();
  const spool = await timed("storescu", storescuArgs("SPOOL", spoolPort, files));
  if (spool.code !== 0) throw new Error(`storescu to the gateway failed:\n${spool.output.slice(-2000)}`);
  await until("all instances labeled in Orthanc", async () => (await labeledCount(oSpool)) === N);
  const spoolE2e = (performance.now() - t0) / 1000;
  if (mark) floors.spoolE2e = wan!.floors(mark);
  labels.spool = await checkLabels(oSpool, N);
  await gSpool.stop();

  // (b') across the link only: the gateway, Spool, Isolation Shared (no lookup before each acknowledgement),
  // and Strict over HTTPS (nginx with client certificates in front of Orthanc).
  const extra = { sharedAck: NaN, sharedE2e: NaN, httpsAck: NaN, httpsE2e: NaN };
  if (wan) {
    for (const [variant, isolation, https] of [["shared", "Shared", false], ["https", "Strict", true]] as const) {
      const oV = await orthanc();
      const vPort = await freePort();
      const gV = await startGatewayProcess(await gatewayConfig(oV, [{ AET: "VARIANT", Port: vPort, Labels: [LABEL], Isolation: isolation }], {}, https));
      gateways.push(gV);
      mark = wan.mark();
      const tV = performance.now();
      const rV = await timed("storescu", storescuArgs("VARIANT", vPort, files));
      if (rV.code !== 0) throw new Error(`storescu to the gateway (${variant}) failed:\n${rV.output.slice(-2000)}`);
      await until("all instances labeled in Orthanc", async () => (await labeledCount(oV)) === N);
      extra[`${variant}Ack`] = rV.seconds;
      extra[`${variant}E2e`] = (performance.now() - tV) / 1000;
      floors[`${variant}E2e`] = wan.floors(mark);
      labels[variant] = await checkLabels(oV, N);
      await gV.stop();
    }
  }

  // (c) the gateway, Sync
  const oSync = await orthanc();
  const syncPort = await freePort();
  const gSync = await startGatewayProcess(await gatewayConfig(oSync, [{ AET: "SYNC", Port: syncPort, Labels: [LABEL], Forwarding: "Sync" }]));
  gateways.push(gSync);
  mark = wan?.mark();
  const sync = await timed("storescu", storescuArgs("SYNC", syncPort, files));
  if (mark) floors.sync = wan!.floors(mark);
  if (sync.code !== 0) throw new Error(`storescu to the gateway (Sync) failed:\n${sync.output.slice(-2000)}`);
  labels.sync = await checkLabels(oSync, N);
  await gSync.stop();

  // (d) the floor
  const scp = await startStorescp();
  const cpu0 = cpuSeconds();
  const floor = await timed("storescu", storescuArgs("FLOOR", scp.port, files));
  const cpuFloor = cpuSeconds() - cpu0;
  await scp.stop();
  rmSync(scp.dir, { recursive: true, force: true });

  // (e), (f) Orthanc's REST API alone, for reference
  const restParallel = await restIngest(files, 4);
  const restSerial = await restIngest(files, 1);
  labels.rest = restParallel.labels;
  if (restParallel.floors) floors.restParallel = restParallel.floors;
  if (restSerial.floors) floors.restSerial = restSerial.floors;

  await Promise.all(proxies.splice(0).map((p) => p.stop()));
  await Promise.all(orthancs.splice(started).map((o) => o.stop()));
  await wan?.close();
  return {
    plugin: plugin.seconds,
    spoolAck: spool.seconds,
    spoolE2e,
    ...extra,
    sync: sync.seconds,
    floor: floor.seconds,
    restParallel: restParallel.seconds,
    restSerial: restSerial.seconds,
    cpuFloor,
    cpuRestParallel: restParallel.cpu,
    labels,
    floors,
  };
}

/** CPU time used so far by the whole machine (all processes, all cores), from /proc/stat. */
function cpuSeconds(): number {
  const f = readFileSync("/proc/stat", "utf8").split("\n")[0]!.trim().split(/\s+/).slice(1).map(Number);
  // user nice system idle iowait irq softirq steal: busy = all but idle and iowait
  return (f[0]! + f[1]! + f[2]! + f[5]! + f[6]! + (f[7] ?? 0)) / 100;
}

async function main(): Promise<void> {
  const ri = process.argv.indexOf("--rounds");
  const ROUNDS = ri >= 0 ? Number(process.argv[ri + 1]) : 3;
  const ii = process.argv.indexOf("--instances");
  const INSTANCES = ii >= 0 ? Number(process.argv[ii + 1]) : 500;
  if (!(INSTANCES > 0 && INSTANCES % 20 === 0)) throw new Error(`--instances ${process.argv[ii + 1]}: a multiple of 20 (5 patients x 2 studies x 2 series x N/20)`);
  console.log("dicom-gateway C-STORE benchmark (dcmtk storescu with TCP_NODELAY=1, Orthanc from scripts/orthanc-testbed.ts)\n");
  if (wan) console.log(`across ${wan.describe()}: storescu -> plugin, gateway -> Orthanc REST, (e)/(f) -> Orthanc REST\n`);
  const data = await generateDataset({ outDir: join(REPO, ".cache", `bench-dataset-${INSTANCES}`), patients: 5, studiesPerPatient: 2, seriesPerStudy: 2, instancesPerSeries: INSTANCES / 20 });
  const files = data.instances.map((i) => i.path);
  const N = files.length;

  const rounds: Round[] = [];
  for (let r = 0; r < ROUNDS; r++) rounds.push(await oneRound(files));
  const m = (k: keyof Omit<Round, "labels" | "floors">) => median(rounds.map((r) => r[k]));
  const range = (k: keyof Omit<Round, "labels" | "floors">) => `${Math.min(...rounds.map((r) => r[k])).toFixed(2)}-${Math.max(...rounds.map((r) => r[k])).toFixed(2)}`;
  const wrong = rounds.flatMap((r) => Object.entries(r.labels).filter(([, v]) => !v.startsWith("ok")).map(([k, v]) => `${k}: ${v}`));
  const plugin = m("plugin");
  const floorsOf = (k: Measured) => (wan ? floorCells(rounds.some((r) => r.floors[k]) ? medianFloors(rounds.map((r) => r.floors[k]!)) : undefined, wan.rttMs) : []);
  const row = (name: string, k: Measured) => [name, m(k), range(k), (N / m(k)).toFixed(0), (m(k) / plugin).toFixed(2), ...floorsOf(k)];

  console.log(`${N} instances (${(statSync(files[0]!).size / 1024).toFixed(0)} KiB each), one association; median of ${ROUNDS} rounds, each on fresh Orthancs:\n`);
  console.log(
    table([
      ["target", "seconds", "range", "inst/s", "vs plugin", ...(wan ? ["floor: bytes / bandwidth s", "floor: round trips x RTT s"] : [])],
      row("(a) Orthanc MultitenantDicom plugin", "plugin"),
      row("(b) gateway Spool: last ack", "spoolAck"),
      row("(b) gateway Spool: all in Orthanc, labeled", "spoolE2e"),
      ...(wan
        ? [
            row("(b) Spool, Isolation Shared: last ack", "sharedAck"),
            row("(b) Spool, Isolation Shared: all in Orthanc", "sharedE2e"),
            row("(b) Spool over HTTPS (nginx, client cert): last ack", "httpsAck"),
            row("(b) Spool over HTTPS: all in Orthanc", "httpsE2e"),
          ]
        : []),
      row("(c) gateway Sync", "sync"),
      row("(d) dcmtk storescp to disk (floor)", "floor"),
      row("(e) Orthanc REST alone, 4 parallel (no DICOM)", "restParallel"),
      row("(f) Orthanc REST alone, one at a time", "restSerial"),
    ]),
  );
  console.log(`\nlabels at Study, Series and Instance level: ${wrong.length === 0 ? `all ${N} instances, every target, every round` : `WRONG: ${wrong.join("; ")}`}`);
  const cores = (await import("node:os")).cpus().length;
  // Receiving the instances (at least what storescu + storescp use) and Orthanc ingesting them through
  // REST (at least what (e) uses) share the machine's cores: end-to-end cannot take less than that work / cores.
  const cpuBound = (m("cpuFloor") + m("cpuRestParallel")) / cores;
  console.log(`
targets (medians):
  Spool ack <= 1/3 of plugin:        ${(m("spoolAck") / plugin).toFixed(2)} ${verdict(m("spoolAck") <= plugin / 3)}
  Spool ack <= 1.5 x storescp floor: ${(m("spoolAck") / m("floor")).toFixed(2)} ${verdict(m("spoolAck") <= 1.5 * m("floor"))}
  Spool end-to-end <= 1/2 of plugin: ${(m("spoolE2e") / plugin).toFixed(2)} ${verdict(m("spoolE2e") <= plugin / 2)}
  Sync <= 1/1.2 of plugin:           ${(m("sync") / plugin).toFixed(2)} ${verdict(m("sync") <= plugin / 1.2)}
lower bounds on this machine (${cores} cores), from rows d, e, f:
  end-to-end >= CPU of (d) + CPU of (e), over ${cores} cores: ${m("cpuFloor").toFixed(2)} + ${m("cpuRestParallel").toFixed(2)} CPU-s / ${cores} = ${cpuBound.toFixed(2)} s = ${(cpuBound / plugin).toFixed(2)} of plugin
  Sync >= (d) + (f):                 ${(m("floor") + m("restSerial")).toFixed(2)} s = ${((m("floor") + m("restSerial")) / plugin).toFixed(2)} of plugin
    (storescu sends an instance only after the previous one's answer, and Sync answers only once Orthanc has it)
`);

  // Parallel associations: 4 × N/4 into fresh Orthancs.
  const Q = N / 4;
  const quarters = [0, 1, 2, 3].map((q) => files.slice(q * Q, q * Q + Q));
  const pPort = await freePort();
  const oP = await orthanc({ AET: "PLUGINP", Port: pPort });
  const pTarget = await dicomPort(pPort);
  let mark = wan?.mark();
  let t = performance.now();
  const pr = await Promise.all(quarters.map((f) => timed("storescu", storescuArgs("PLUGINP", pTarget, f))));
  const pluginPar = (performance.now() - t) / 1000;
  const pluginParFloors = mark && wan!.floors(mark);
  if (pr.some((r) => r.code !== 0) || (await labeledCount(oP)) !== N) throw new Error("parallel storescu to the plugin failed");
  const oG = await orthanc();
  const gPort = await freePort();
  const gPar = await startGatewayProcess(await gatewayConfig(oG, [{ AET: "PAR", Port: gPort, Labels: [LABEL] }]));
  gateways.push(gPar);
  mark = wan?.mark();
  t = performance.now();
  const gr = await Promise.all(quarters.map((f) => timed("storescu", storescuArgs("PAR", gPort, f))));
  const gwParAck = (performance.now() - t) / 1000;
  if (gr.some((r) => r.code !== 0)) throw new Error("parallel storescu to the gateway failed");
  await until("all instances labeled in Orthanc", async () => (await labeledCount(oG)) === N);
  const gwParE2e = (performance.now() - t) / 1000;
  const gwParFloors = mark && wan!.floors(mark);
  const floorsPar = (f: Floors | undefined) => (wan ? floorCells(f, wan.rttMs) : []);
  console.log(`4 parallel associations × ${Q} instances:\n`);
  console.log(
    table([
      ["target", "seconds", "inst/s", "vs plugin", ...(wan ? ["floor: bytes / bandwidth s", "floor: round trips x RTT s"] : [])],
      ["plugin", pluginPar, (N / pluginPar).toFixed(0), "1.00", ...floorsPar(pluginParFloors)],
      ["gateway Spool: last ack", gwParAck, (N / gwParAck).toFixed(0), (gwParAck / pluginPar).toFixed(2), ...floorsPar(undefined)],
      ["gateway Spool: all in Orthanc, labeled", gwParE2e, (N / gwParE2e).toFixed(0), (gwParE2e / pluginPar).toFixed(2), ...floorsPar(gwParFloors)],
    ]),
  );
  if (process.argv.includes("--no-large")) return;

  // One ~1 GiB instance.
  const big = makeLargeInstance();
  const oBig = await orthanc();
  const bPort = await freePort();
  const gBig = await startGatewayProcess(await gatewayConfig(oBig, [{ AET: "BIG", Port: bPort, Labels: [LABEL], SpoolQuotaMB: 4096 }]));
  gateways.push(gBig);
  mark = wan?.mark();
  const rssBefore = gBig.peakRssMiB();
  const b = await timed("storescu", ["-aet", "BENCHSCU", "-aec", "BIG", "127.0.0.1", String(bPort), big.path]);
  if (b.code !== 0) throw new Error(`storescu of the large instance failed:\n${b.output.slice(-2000)}`);
  const rssAfterAck = gBig.peakRssMiB();
  await until("the large instance is in Orthanc", async () => (await gBig.status()).tenants[0]!.spool.depth === 0, 600_000, 200);
  const rssAfterForward = gBig.peakRssMiB();
  const forwarded = (performance.now() - b.startedAt) / 1000;
  const bigFloors = mark && wan!.floors(mark);
  const mbps = big.bytes / 1e6 / b.seconds;
  console.log(`
one ${(big.bytes / 2 ** 30).toFixed(2)} GiB instance (storescu, default PDU sizes):
  received and fsync'd in ${b.seconds.toFixed(2)} s = ${mbps.toFixed(0)} MB/s to the spool (target >= 200 MB/s: ${verdict(mbps >= 200)})
  gateway peak RSS (VmHWM): ${rssBefore.toFixed(0)} MiB at start, ${rssAfterAck.toFixed(0)} MiB after the ack, ${rssAfterForward.toFixed(0)} MiB after forwarding to Orthanc (target < 150 MiB: ${verdict(rssAfterForward < 150)})${
    bigFloors ? `\n  in Orthanc ${forwarded.toFixed(2)} s after storescu started; floors over the link: ${floorCells(bigFloors, wan!.rttMs).join(" s, ")} s` : ""
  }
`);
  rmSync(big.path, { force: true });
}

try {
  await main();
} finally {
  await Promise.all(gateways.map((g) => g.stop()));
  await Promise.all(proxies.map((p) => p.stop()));
  await Promise.all(orthancs.map((o) => o.stop()));
  await wan?.close();
}
