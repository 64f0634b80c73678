/**
 * HTTPS to Orthanc with a private CA and a client certificate (`Gateway.Orthanc.Tls`, issue 18), through
 * the test bed's nginx in front of a real Orthanc (client certificates required): the client keeps its
 * TLS connections alive, pipelines an upload with its labels, streams a large instance both ways; a
 * wrong CA, no client certificate, one from another CA, plain http to the TLS port and an unusable key
 * each fail with what to fix — in the client's error and in the gateway's /ready.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { issueCertificate, makeCertificateAuthority, startTlsProxy, type CertificateAuthority, type IssuedCertificate, type TlsProxyHandle } from "../scripts/orthanc-testbed.ts";
import { OrthancClient, OrthancError } from "../src/orthanc/client.ts";
import { orthancIds } from "../src/orthanc/identity.ts";
import { Labeler } from "../src/orthanc/labeler.ts";
import { uploadFile, uploadLabeled } from "../src/orthanc/store.ts";
import { buildInstance } from "./helpers/instances.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { getSharedOrthanc, ORTHANC_START_TIMEOUT_MS, runDcmtk, type OrthancHandle } from "./helpers/orthanc.ts";
import { removeTempDir, tempDir } from "./helpers/temp.ts";

const REPO = join(import.meta.dir, "..");

/** An instance of about `size` bytes with fresh UIDs. */
const instance = (size: number, patientId = "TLSPAT") => buildInstance(size, { patientId });

const sha = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

describe("HTTPS to Orthanc through nginx with client certificates", () => {
  let orthanc: OrthancHandle;
  let proxy: TlsProxyHandle;
  let dir: string;
  let otherCa: CertificateAuthority;
  let otherClient: IssuedCertificate;
  const pem = (f: string) => readFileSync(f, "utf8");
  const tls = () => ({ ca: pem(proxy.caFile), cert: pem(proxy.clientCertFile), key: pem(proxy.clientKeyFile) });
  const clients: OrthancClient[] = [];
  const client = (opts: Partial<ConstructorParameters<typeof OrthancClient>[0]> = {}) => {
    const c = new OrthancClient({ url: proxy.url, tls: tls(), timeoutMs: 10_000, ...opts });
    clients.push(c);
    return c;
  };
  const failure = async (c: OrthancClient) => {
    const e = await c.system().then(() => undefined, (err: unknown) => err);
    expect(e).toBeInstanceOf(OrthancError);
    return e as OrthancError;
  };

  beforeAll(async () => {
    orthanc = await getSharedOrthanc();
    proxy = await startTlsProxy(orthanc);
    dir = tempDir("orthanc-tls-");
    otherCa = await makeCertificateAuthority(dir, "other-ca");
    otherClient = await issueCertificate(otherCa, dir, "other-client", "client");
  }, ORTHANC_START_TIMEOUT_MS);

  afterAll(async () => {
    for (const c of clients) c.close();
    await proxy?.stop();
    removeTempDir(dir);
  }, 20_000);

  test("kept alive: 20 calls in a row over one TLS connection", async () => {
    const c = client();
    for (let i = 0; i < 20; i++) expect((await c.system()).Version).toBeString();
    expect(c.stats).toMatchObject({ requests: 20, connections: 1, reused: 19 });
  });

  test("an upload with its labels pipelined: one round trip, the labels on the instance, its series and study", async () => {
    const c = client();
    const x = instance(2000);
    const ids = orthancIds({ patientId: x.patientId, studyInstanceUid: x.study, seriesInstanceUid: x.series, sopInstanceUid: x.sop });
    const labeler = new Labeler(c);
    const plan = labeler.plan(ids, { labels: ["tls"], labelsStoreLevels: ["Study", "Series", "Instance"] });
    const up = await uploadLabeled(c, labeler, x.bytes, plan, { attachment: true });
    expect(up.stored).toMatchObject({ id: ids.instance, parentStudy: ids.study, parentSeries: ids.series, status: "Success" });
    expect(up.labeled).toBe(true);
    expect(up.attachment).toEqual({ md5: createHash("md5").update(x.bytes).digest("hex"), size: x.bytes.length });
    expect(c.calls.upload).toEqual({ calls: 1, roundTrips: 1 });
    expect(c.calls.label).toEqual({ calls: 3, roundTrips: 0 });
    expect(c.stats).toMatchObject({ connections: 1, pipelined: 5 });
    for (const path of [`/instances/${ids.instance}`, `/series/${ids.series}`, `/studies/${ids.study}`]) expect(await c.getJson<string[]>(`${path}/labels`)).toEqual(["tls"]);
  });

  test("a large instance streamed both ways: uploaded as it is read from disk, read back as it arrives", async () => {
    const c = client();
    const x = instance(6 << 20);
    const file = join(dir, "large.dcm");
    writeFileSync(file, x.bytes);
    const stored = await uploadFile(c, { file, offset: 0, size: x.bytes.length });
    expect(stored.status).toBe("Success");
    const res = await c.request("GET", `/instances/${stored.id}/file`);
    const hash = createHash("sha256");
    let chunks = 0;
    for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
      hash.update(chunk);
      chunks++;
    }
    expect(hash.digest("hex")).toBe(sha(x.bytes));
    expect(chunks).toBeGreaterThan(1);
    // Both on one kept-alive connection: the streamed body was read to its end before the GET.
    expect(c.stats.connections).toBe(1);
  });

  test("a CA that did not sign the server's certificate: kind tls, naming Gateway.Orthanc.Tls.CA", async () => {
    const e = await failure(client({ tls: { ...tls(), ca: pem(otherCa.certFile) } }));
    expect(e.kind).toBe("tls");
    expect(e.message).toStartWith(`Orthanc at ${proxy.url}: the TLS handshake failed (`);
    expect(e.message).toContain("not signed by the CA in Gateway.Orthanc.Tls.CA");
    // Without Tls.CA the runtime's CAs do not know the test bed's private CA either.
    expect((await failure(client({ tls: { cert: tls().cert, key: tls().key } }))).message).toContain("set Gateway.Orthanc.Tls.CA");
  });

  test("no client certificate: nginx answers 400, which says to set Gateway.Orthanc.Tls.Certificate and Key", async () => {
    const e = await failure(client({ tls: { ca: pem(proxy.caFile) } }));
    expect(e).toMatchObject({ kind: "tls", status: 400 });
    expect(e.message).toBe(
      `Orthanc at ${proxy.url}: the TLS proxy in front of it answered 400 Bad Request to GET /system: it requires a client certificate: set Gateway.Orthanc.Tls.Certificate and Gateway.Orthanc.Tls.Key`,
    );
  });

  test("a client certificate from another CA: refused, naming Gateway.Orthanc.Tls.Certificate", async () => {
    const e = await failure(client({ tls: { ca: pem(proxy.caFile), cert: pem(otherClient.certFile), key: pem(otherClient.keyFile) } }));
    expect(e).toMatchObject({ kind: "tls", status: 400 });
    expect(e.message).toContain("it refused the client certificate of Gateway.Orthanc.Tls.Certificate");
  });

  test("plain http to the TLS port, TLS to Orthanc's plain port: each says to check the scheme", async () => {
    expect((await failure(client({ url: `http://127.0.0.1:${proxy.port}` }))).message).toContain("that port speaks HTTPS: write https:// in Gateway.Orthanc.Url");
    const e = await failure(client({ url: `https://127.0.0.1:${orthanc.httpPort}` }));
    expect(e.kind).toBe("tls");
    expect(e.message).toContain("the server does not speak TLS on that port");
  });

  test("a key that is not the certificate's: refused when the client is made (the gateway does not start)", () => {
    expect(() => client({ tls: { ...tls(), key: pem(otherClient.keyFile) } })).toThrow(/^Gateway\.Orthanc\.Tls cannot be used \(.*KEY_VALUES_MISMATCH.*Certificate and Key cannot be used/);
  });

  describe("the gateway with Gateway.Orthanc.Tls", () => {
    const config = (t: Record<string, string>) => ({ Gateway: { Orthanc: { Url: proxy.url, Tls: t, UnreachableGraceSeconds: 0 } } });
    const files = () => ({ CA: proxy.caFile, Certificate: proxy.clientCertFile, Key: proxy.clientKeyFile });

    test("/ready 200; C-STORE (Spool and Sync) stored and labeled, C-FIND answered, over a few kept-alive connections", async () => {
      const gw = await startTestGateway([{ AET: "TLSSPOOL", Labels: ["tls-spool"] }, { AET: "TLSSYNC", Labels: ["tls-sync"], Forwarding: "Sync" }], proxy.url, config(files()));
      try {
        expect((await fetch(`${gw.httpUrl}/ready`)).status).toBe(200);
        for (const aet of ["TLSSPOOL", "TLSSYNC"]) {
          const x = instance(4000, `TLS-${aet}`);
          const f = join(dir, `${aet}.dcm`);
          writeFileSync(f, x.bytes);
          const r = await runDcmtk("storescu", ["-aec", aet, "127.0.0.1", String(gw.portOf(aet)), f]);
          expect(r.code).toBe(0);
          await gw.forwarder.idle();
          const id = orthancIds({ patientId: x.patientId, studyInstanceUid: x.study, seriesInstanceUid: x.series, sopInstanceUid: x.sop }).instance;
          expect(await (await fetch(`${orthanc.url}/instances/${id}/labels`)).json()).toEqual([aet === "TLSSPOOL" ? "tls-spool" : "tls-sync"]);
          const find = await runDcmtk("findscu", ["-S", "-aec", aet, "-k", "QueryRetrieveLevel=STUDY", "-k", `StudyInstanceUID=${x.study}`, "127.0.0.1", String(gw.portOf(aet))]);
          expect(find.code).toBe(0);
          expect(find.stderr + find.stdout).toContain(x.study);
        }
        // Keep-alive: a handful of connections (parallel calls), not one per call.
        expect(gw.orthanc.stats.connections).toBeLessThan(gw.orthanc.stats.requests / 2);
      } finally {
        await gw.stop();
      }
    });

    for (const [name, t, reason] of [
      ["a CA that did not sign nginx's certificate", () => ({ ...files(), CA: otherCa.certFile }), /TLS handshake failed \(.*\): the server's certificate is not signed by the CA in Gateway\.Orthanc\.Tls\.CA/],
      ["no client certificate", () => ({ CA: proxy.caFile }), /it requires a client certificate: set Gateway\.Orthanc\.Tls\.Certificate and Gateway\.Orthanc\.Tls\.Key$/],
    ] as const) {
      test(`${name}: /ready 503 with the reason`, async () => {
        const gw = await startTestGateway([{ AET: "TLSBAD", Labels: ["tls-bad"] }], proxy.url, config(t()));
        try {
          const res = await fetch(`${gw.httpUrl}/ready`);
          expect(res.status).toBe(503);
          const { reasons } = (await res.json()) as { reasons: string[] };
          expect(reasons).toHaveLength(1);
          expect(reasons[0]).toStartWith(`Orthanc at ${proxy.url}: `);
          expect(reasons[0]).toMatch(reason);
        } finally {
          await gw.stop();
        }
      });
    }
  });

  test("under Deno, the same client (node:tls): kept alive, an upload with its labels pipelined", () => {
    const x = instance(3000, "TLSDENO");
    const file = join(dir, "deno.dcm");
    writeFileSync(file, x.bytes);
    const script = join(dir, "deno-client.ts");
    writeFileSync(
      script,
      `import { readFileSync } from "node:fs";
import { OrthancClient } from ${JSON.stringify(join(REPO, "src/orthanc/client.ts"))};
import { Labeler } from ${JSON.stringify(join(REPO, "src/orthanc/labeler.ts"))};
import { uploadLabeled } from ${JSON.stringify(join(REPO, "src/orthanc/store.ts"))};
import { orthancIds } from ${JSON.stringify(join(REPO, "src/orthanc/identity.ts"))};
const [url, ca, cert, key, file, patientId, study, series, sop] = Deno.args;
const c = new OrthancClient({ url, tls: { ca: readFileSync(ca, "utf8"), cert: readFileSync(cert, "utf8"), key: readFileSync(key, "utf8") } });
for (let i = 0; i < 5; i++) await c.system();
const ids = orthancIds({ patientId, studyInstanceUid: study, seriesInstanceUid: series, sopInstanceUid: sop });
const labeler = new Labeler(c);
const up = await uploadLabeled(c, labeler, new Uint8Array(readFileSync(file)), labeler.plan(ids, { labels: ["deno"], labelsStoreLevels: ["Instance"] }));
console.log(JSON.stringify({ stats: c.stats, status: up.stored.status, labeled: up.labeled, labels: await c.getJson(\`/instances/\${ids.instance}/labels\`) }));
c.close();
`,
    );
    const r = spawnSync(join(REPO, "node_modules/.bin/deno"), ["run", "--allow-read", "--allow-net", "--allow-env", script, proxy.url, proxy.caFile, proxy.clientCertFile, proxy.clientKeyFile, file, x.patientId, x.study, x.series, x.sop], { encoding: "utf8", timeout: 60_000 });
    expect(r.stderr).not.toContain("error");
    const out = JSON.parse(r.stdout.trim().split("\n").pop()!);
    expect(out).toMatchObject({ status: "Success", labeled: true, labels: ["deno"], stats: { connections: 1, requests: 7, pipelined: 1 } });
  }, 60_000);
});
