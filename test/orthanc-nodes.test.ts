/**
 * The nodes of an Orthanc cluster behind one client (src/orthanc/nodes.ts) and their monitor
 * (src/orthanc/cluster-monitor.ts), against the real Orthanc: nodes that refuse connections, cut an
 * upload in the middle, or answer 502 like a proxy in front of a dead Orthanc; and readiness from them.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { writeFileSync } from "node:fs";
import { createServer as createHttpServer, type Server as HttpServer } from "node:http";
import { createServer, type Server } from "node:net";
import { join } from "node:path";
import { OrthancError } from "../src/orthanc/client.ts";
import { ClusterMonitor } from "../src/orthanc/cluster-monitor.ts";
import { OrthancNodes, pinned, PinnedOrthanc, type OrthancNode } from "../src/orthanc/nodes.ts";
import { uploadFile, STREAM_ABOVE } from "../src/orthanc/store.ts";
import { readiness, type GatewaySnapshot } from "../src/observe/status.ts";
import { element, freshUid, identityDataset, part10, TS } from "./helpers/dicom-build.ts";
import { startRewritingProxy, type RewritingProxy } from "./helpers/http-proxy.ts";
import { getSharedOrthanc, ORTHANC_START_TIMEOUT_MS, type OrthancHandle } from "./helpers/orthanc.ts";
import { freePort } from "./helpers/ports.ts";
import { readFileSync } from "node:fs";
import { request as httpRequest } from "node:http";
import { runTool } from "./helpers/dcmtk.ts";
import { pydicomFile, uniqueCopies } from "./helpers/dicom-files.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { startStorescp } from "./helpers/storescp.ts";
import { tempDir } from "./helpers/temp.ts";

let orthanc: OrthancHandle;
let dead: string;
const closers: (() => Promise<void> | void)[] = [];

beforeAll(async () => {
  orthanc = await getSharedOrthanc();
  dead = `http://127.0.0.1:${await freePort()}`;
}, ORTHANC_START_TIMEOUT_MS);

afterAll(async () => {
  for (const c of closers) await c();
});

function cluster(urls: string[], failovers: string[] = []): OrthancNodes {
  const nodes = new OrthancNodes(urls, { timeoutMs: 5000, onFailover: (n: OrthancNode, _e, next) => failovers.push(`${n.url} -> ${next?.url ?? "none"}`) });
  closers.push(() => nodes.close());
  return nodes;
}

async function proxy(): Promise<RewritingProxy> {
  const p = await startRewritingProxy(orthanc.url);
  closers.push(() => p.close());
  return p;
}

/** An HTTP server answering every request with `status`, as nginx does for an Orthanc that is away. */
async function answering(status: number): Promise<{ url: string; hits: () => number }> {
  let hits = 0;
  const s: HttpServer = createHttpServer((req, res) => {
    hits++;
    req.resume();
    res.writeHead(status, { "content-type": "text/html" });
    res.end(`<html>${status}</html>`);
  });
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", () => r()));
  closers.push(() => new Promise<void>((r) => s.close(() => r())));
  return { url: `http://127.0.0.1:${(s.address() as { port: number }).port}`, hits: () => hits };
}

describe("OrthancNodes: a call goes to a node that answers", () => {
  test("a node that refuses connections is marked down and the call sent on; later calls go straight to the live node", async () => {
    const failovers: string[] = [];
    const nodes = cluster([dead, orthanc.url], failovers);
    const sys = await nodes.system();
    expect(sys.Version).toBeString();
    expect(failovers).toEqual([`${dead} -> ${orthanc.url}`]);
    expect(nodes.nodes.map((n) => n.healthy)).toEqual([false, true]);
    expect(nodes.nodes[0]!.lastError).toContain("ECONNREFUSED");
    for (let i = 0; i < 4; i++) await nodes.getJson("/system");
    expect(failovers.length).toBe(1);
    expect(nodes.healthyCount).toBe(1);
  });

  test("healthy nodes take calls in turn", async () => {
    const [a, b] = [await proxy(), await proxy()];
    const nodes = cluster([a.url, b.url]);
    for (let i = 0; i < 10; i++) await nodes.getJson("/system");
    expect([a.requests.length, b.requests.length]).toEqual([5, 5]);
  });

  test("pin(): an operation's calls stay on one node, and move on for good when it fails", async () => {
    const [a, b] = [await proxy(), await proxy()];
    const failovers: string[] = [];
    const nodes = cluster([a.url, b.url], failovers);
    const op = nodes.pin();
    expect(pinned(nodes)).toBeInstanceOf(PinnedOrthanc);
    for (let i = 0; i < 3; i++) await op.postJson("/tools/find", { Level: "Study", Query: {}, Limit: 1 });
    const first = op.current.url;
    const [here, there] = first === a.url ? [a, b] : [b, a];
    expect([here.requests.length, there.requests.length]).toEqual([3, 0]);
    await here.close();
    for (let i = 0; i < 3; i++) await op.getJson("/system");
    expect(op.current.url).toBe(there.url);
    expect([here.requests.length, there.requests.length]).toEqual([3, 3]);
    expect(failovers).toEqual([`${here.url} -> ${there.url}`]);
    // A single client is its own pin.
    expect(pinned(nodes.nodes[0]!.client)).toBe(nodes.nodes[0]!.client);
  });

  test("502, 503 and 504 from a proxy in front of a node are the node failing; Orthanc's own answers (404) are not", async () => {
    for (const status of [502, 503, 504]) {
      const gateway = await answering(status);
      const failovers: string[] = [];
      const nodes = cluster([gateway.url, orthanc.url], failovers);
      expect((await nodes.system()).Version).toBeString();
      expect([gateway.hits(), failovers.length]).toEqual([1, 1]);
    }
    const failovers: string[] = [];
    const nodes = cluster([orthanc.url, dead], failovers);
    const err = await nodes.getJson("/instances/no-such-instance").catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OrthancError);
    expect((err as OrthancError).status).toBe(404);
    expect(failovers).toEqual([]);
  });

  test("no node answers: one error naming every node; a single node: its own error unchanged", async () => {
    const other = `http://127.0.0.1:${await freePort()}`;
    const err = (await cluster([dead, other]).system().catch((e: unknown) => e)) as OrthancError;
    expect(err).toBeInstanceOf(OrthancError);
    expect(err.kind).toBe("unreachable");
    expect(err.message).toStartWith("no Orthanc node of Gateway.Orthanc.Url answered (");
    expect(err.message).toContain(`${dead}: Orthanc at ${dead} is unreachable (ECONNREFUSED)`);
    expect(err.message).toContain(`${other}: Orthanc at ${other} is unreachable (ECONNREFUSED)`);
    const one = (await cluster([dead]).system().catch((e: unknown) => e)) as OrthancError;
    expect(one.message).toBe(`Orthanc at ${dead} is unreachable (ECONNREFUSED): check Gateway.Orthanc.Url and that Orthanc is running`);
  });

  test("a streamed upload (> 4 MiB) that a node cuts in the middle is sent again, from its first byte, to the next node", async () => {
    const sop = freshUid();
    const dataset = identityDataset("explicitLE", { patientId: new TextEncoder().encode("STREAMED"), studyInstanceUid: freshUid(), seriesInstanceUid: freshUid(), sopInstanceUid: sop }, [
      element("explicitLE", 0x7fe00010, "OB", new Uint8Array(STREAM_ABOVE + (1 << 20)).fill(7)),
    ]);
    const file = join(tempDir("gw-nodes-"), "big.dcm");
    const bytes = part10(dataset, TS.explicitLE, sop);
    writeFileSync(file, bytes);
    // A "node" that takes the request and 1 MiB of its body, then resets the connection.
    let received = 0;
    const cutter: Server = createServer((socket) => {
      socket.on("data", (d: Buffer) => {
        received += d.length;
        if (received > 1 << 20) socket.resetAndDestroy();
      });
      socket.on("error", () => {});
    });
    await new Promise<void>((r) => cutter.listen(0, "127.0.0.1", () => r()));
    closers.push(() => new Promise<void>((r) => cutter.close(() => r())));
    const failovers: string[] = [];
    const cutterUrl = `http://127.0.0.1:${(cutter.address() as { port: number }).port}`;
    const nodes = cluster([cutterUrl, orthanc.url], failovers);
    const stored = await uploadFile(nodes, { file, offset: 0, size: bytes.length });
    expect(stored.status).toBe("Success");
    expect(received).toBeGreaterThan(1 << 20);
    expect(failovers).toEqual([`${cutterUrl} -> ${orthanc.url}`]);
    const size = await (await fetch(`${orthanc.url}/instances/${stored.id}/attachments/dicom/size`)).text();
    expect(Number(size)).toBe(bytes.length);
  });
});

describe("ClusterMonitor and readiness", () => {
  const snapshot = (o: GatewaySnapshot["orthanc"], graceMs = 0): GatewaySnapshot => ({ version: "t", startedAt: new Date().toISOString(), tenants: [], orthanc: o, orthancUnreachableGraceMs: graceMs });

  test("one node away: usable, /ready 200 and degraded naming it; the node takes no calls until it answers again", async () => {
    const nodes = cluster([orthanc.url, dead]);
    const monitor = new ClusterMonitor(nodes, { intervalMs: 60_000 });
    const s = await monitor.check();
    expect(s.usableNodes).toBe(1);
    expect(s.reachable).toBe(true);
    expect(s.error).toBeUndefined();
    expect(s.nodes!.map((n) => n.reachable)).toEqual([true, false]);
    expect(nodes.nodes[1]!.healthy).toBe(false);
    const r = readiness(snapshot(s));
    expect(r.ready).toBe(true);
    expect(r.degraded).toBe(`degraded: 1 of 2 Orthanc nodes can be used (Orthanc at ${dead} is unreachable (ECONNREFUSED): check Gateway.Orthanc.Url and that Orthanc is running)`);
  });

  test("no node answers: 503 after the grace period, naming every node; within it, still ready", async () => {
    const other = `http://127.0.0.1:${await freePort()}`;
    const monitor = new ClusterMonitor(cluster([dead, other]), { intervalMs: 60_000 });
    const s = await monitor.check();
    expect(s.reachable).toBe(false);
    const r = readiness(snapshot(s));
    expect(r.ready).toBe(false);
    expect(r.reasons[0]).toStartWith(`Orthanc at ${dead}, ${other} is not reachable: no node of the Orthanc cluster can be used: Orthanc at ${dead} is unreachable`);
    expect(r.degraded).toBeUndefined();
    expect(readiness(snapshot({ ...s, lastSeenAt: new Date().toISOString() }, 60_000)).ready).toBe(true);
  });

  test("a node that answers without what the gateway needs (requirements) cannot be used: a /ready reason when it is the only one", async () => {
    const nodes = cluster([orthanc.url]);
    const monitor = new ClusterMonitor(nodes, { intervalMs: 60_000, requirements: (sys, url) => (url === orthanc.url && sys.Version ? "declare what is missing" : undefined) });
    const s = await monitor.check();
    expect(s.error).toBe(`Orthanc ${s.version} at ${orthanc.url}: declare what is missing`);
    expect(nodes.nodes[0]!.healthy).toBe(false);
    expect(readiness(snapshot(s)).reasons).toEqual([s.error!]);
  });
});

/**
 * A node in front of the real Orthanc that dies in the middle of the `n`-th instance file it serves: it
 * forwards every request, but stops that answer after its headers and `cutAt` bytes of its body, and
 * `dieAfterMs` later resets the connection. `fileRequests` lists the paths of the files asked for (with
 * their `?transcode=`).
 */
async function breakingNode(n: number, cutAt: number, dieAfterMs: number): Promise<{ url: string; files: () => number; cuts: () => number; fileRequests: string[] }> {
  const target = new URL(orthanc.url);
  let files = 0;
  let cuts = 0;
  const fileRequests: string[] = [];
  const server = createHttpServer((req, res) => {
    const isFile = req.method === "GET" && /^\/instances\/[^/?]+\/file(\?|$)/.test(req.url ?? "");
    if (isFile) fileRequests.push(req.url!);
    const cut = isFile && ++files === n;
    if (cut) cuts++;
    const up = httpRequest({ host: target.hostname, port: Number(target.port), method: req.method, path: req.url, headers: req.headers }, (answer) => {
      res.writeHead(answer.statusCode ?? 502, answer.headers);
      if (!cut) return void answer.pipe(res);
      let sent = 0;
      answer.on("data", (chunk: Buffer) => {
        if (sent >= cutAt) return;
        res.write(chunk.subarray(0, cutAt - sent));
        sent += Math.min(chunk.length, cutAt - sent);
        if (sent >= cutAt) {
          answer.destroy();
          setTimeout(() => res.socket?.destroy(), dieAfterMs);
        }
      });
    });
    req.pipe(up);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  closers.push(() => new Promise<void>((r) => (server.closeAllConnections(), server.close(() => r()))));
  return { url: `http://127.0.0.1:${(server.address() as { port: number }).port}`, files: () => files, cuts: () => cuts, fileRequests };
}

/** RLE Lossless (PS3.5 A.4.2), what dcmcrle makes. */
const RLE_LOSSLESS = "1.2.840.10008.1.2.5";

describe("C-MOVE when a node dies in the middle of an instance", () => {
  // [what, cutAt, dieAfterMs, whileSending, transcoded]: `transcoded` stores the instances RLE-compressed and
  // has a destination that takes only uncompressed syntaxes, so each goes transcoded by Orthanc: the copy
  // fetched again must be asked for in the same syntax (?transcode=), or it fits no accepted context.
  const cases: [string, number, number, boolean, boolean][] = [
    ["before its meta header was read (while it is fetched ahead)", 200, 0, false, false],
    ["while it is sent to the destination (20 KiB into its body)", 20 << 10, 300, true, false],
    ["transcoded (stored RLE, the destination uncompressed only), before its meta header was read", 200, 0, false, true],
    ["transcoded (stored RLE, the destination uncompressed only), while it is sent (20 KiB into its body)", 20 << 10, 300, true, true],
  ];
  test.each(cases)("%s: the instance is fetched again from the next node, as planned: every sub-operation completes, each instance arrives whole", async (_what, cutAt, dieAfterMs, whileSending, transcoded) => {
    const { datasetBytes, transferSyntaxesIn } = await import("./helpers/dicom-files.ts");
    const study = freshUid();
    let files = await uniqueCopies(pydicomFile("CT_small.dcm"), 3);
    const r = await runTool("dcmodify", ["-nb", "-i", "(0010,0020)=MOVE-BREAK", "-i", `(0020,000d)=${study}`, "-i", `(0020,000e)=${freshUid()}`, ...files]);
    expect(r.code).toBe(0);
    if (transcoded) {
      files = await Promise.all(
        files.map(async (f) => {
          const c = await runTool("dcmcrle", [f, `${f}.rle`]);
          expect(c.code).toBe(0);
          return `${f}.rle`;
        }),
      );
    }
    const orthancIds = new Map<string, string>(); // file -> Orthanc ID
    for (const f of files) {
      const up = (await (await fetch(`${orthanc.url}/instances`, { method: "POST", body: readFileSync(f) })).json()) as { ID: string; ParentStudy: string };
      orthancIds.set(f, up.ID);
      await fetch(`${orthanc.url}/instances/${up.ID}/labels/mvbreak`, { method: "PUT", body: "" });
      await fetch(`${orthanc.url}/studies/${up.ParentStudy}/labels/mvbreak`, { method: "PUT", body: "" });
      const meta = (await (await fetch(`${orthanc.url}/instances/${up.ID}/metadata?expand`)).json()) as Record<string, string>;
      expect(meta["TransferSyntax"]).toBe(transcoded ? RLE_LOSSLESS : TS.explicitLE);
    }
    // Two nodes, each dying in the middle of the second file it serves: whichever the operation is pinned
    // to serves the first two (fetched ahead), so at least one instance breaks in the middle.
    const [n1, n2] = [await breakingNode(2, cutAt, dieAfterMs), await breakingNode(2, cutAt, dieAfterMs)];
    const warnings: string[] = [];
    const { createLogger } = await import("../src/shared/log.ts");
    // storescp with no option accepts only the uncompressed syntaxes.
    const dest = await startStorescp("BREAKDEST", transcoded ? [] : ["+xa"]);
    closers.push(() => dest.stop());
    const gw = await startTestGateway([{ AET: "MVBREAK", Labels: ["mvbreak"] }], n1.url, {
      DicomModalities: { dest: ["BREAKDEST", "127.0.0.1", dest.port] },
      Gateway: { Orthanc: { Url: [n1.url, n2.url] } },
    }, { logger: createLogger({ level: "warn", format: "json", sink: (l) => warnings.push(l) }) });
    closers.push(() => gw.stop());
    const move = await runTool("movescu", ["-v", "-S", "-aet", "WORKSTATION", "-aec", "MVBREAK", "-aem", "BREAKDEST", "-k", "QueryRetrieveLevel=STUDY", "-k", `StudyInstanceUID=${study}`, "127.0.0.1", String(gw.portOf("MVBREAK"))], { timeoutMs: 30_000 });
    expect(move.output).toContain("Received Final Move Response (Success)");
    expect(n1.cuts() + n2.cuts()).toBeGreaterThanOrEqual(1);
    // Sent to the destination in part: the association was aborted and the instance sent again on a new one.
    expect(warnings.some((l) => l.includes("C-MOVE: Orthanc's stream of an instance broke, fetching it again"))).toBe(whileSending);
    const got = dest.received();
    expect(got.size).toBe(3);
    const syntaxes = transferSyntaxesIn(dest.dir);
    // Every file the nodes were asked for, the re-fetches included: as stored, or transcoded to what arrived.
    const requests = [...n1.fileRequests, ...n2.fileRequests];
    expect(requests.length).toBeGreaterThanOrEqual(4);
    for (const f of files) {
      const bytes = new Uint8Array(readFileSync(f));
      const sop = [...got.keys()].find((k) => Buffer.from(bytes).includes(Buffer.from(k)));
      expect(sop).toBeDefined();
      if (!transcoded) {
        expect(Buffer.from(got.get(sop!)!).equals(Buffer.from(datasetBytes(bytes)))).toBe(true);
        continue;
      }
      const ts = syntaxes.get(sop!)!;
      expect([TS.explicitLE, TS.implicit] as string[]).toContain(ts);
      // What Orthanc's transcoder makes of the stored instance, byte for byte.
      const id = orthancIds.get(f)!;
      const expected = datasetBytes(new Uint8Array(await (await fetch(`${orthanc.url}/instances/${id}/file?transcode=${ts}`)).arrayBuffer()));
      expect(Buffer.from(got.get(sop!)!).equals(Buffer.from(expected))).toBe(true);
      const asked = requests.filter((q) => q.startsWith(`/instances/${id}/file`));
      expect(asked.length).toBeGreaterThanOrEqual(1);
      expect(asked.every((q) => q === `/instances/${id}/file?transcode=${encodeURIComponent(ts)}`)).toBe(true);
    }
    if (!transcoded) expect(requests.every((q) => !q.includes("?"))).toBe(true);
    const m = await (await fetch(`${gw.httpUrl}/metrics`)).text();
    expect(m).toMatch(/dicom_gateway_retrieve_suboperations_total\{tenant="MVBREAK",service="C-MOVE",destination="dest",status="completed"\} 3/);
    if (transcoded) expect(m).toMatch(/dicom_gateway_retrieve_transcoded_suboperations_total\{tenant="MVBREAK",service="C-MOVE",destination="dest",status="completed"\} 3/);
    else expect(m).not.toContain("dicom_gateway_retrieve_transcoded_suboperations_total{");
  }, 60_000);
});
