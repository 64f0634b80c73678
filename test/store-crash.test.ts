/**
 * Crash safety of store-and-forward: the gateway is killed with SIGKILL in the middle of an ingest;
 * after a restart every instance storescu saw acknowledged is in Orthanc, labeled, exactly once.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { spawn } from "node:child_process";
import { startOrthanc, type OrthancHandle } from "../scripts/orthanc-testbed.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { DCMTK_ENV } from "./helpers/dcmtk.ts";
import { pydicomFile, tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { firstTenantPort, httpPortFromLog, serveFromSource, testConfigObject, writeConfigFile, type GatewayProcess } from "./helpers/gateway.ts";
import { tempDir } from "./helpers/temp.ts";

let orthanc: OrthancHandle;
const gateways: GatewayProcess[] = [];

beforeAll(async () => {
  orthanc = await startOrthanc();
}, 120_000);

afterAll(async () => {
  await Promise.all(gateways.map((g) => g.stop()));
  await orthanc?.stop();
}, 30_000);

test("kill -9 mid-ingest, restart: every acknowledged instance is in Orthanc, labeled, none duplicated", async () => {
  const N = 300;
  const files = await uniqueCopies(pydicomFile("CT_small.dcm"), N, { newStudy: true });
  const spool = tempDir("gw-crash-spool-");
  const config = await testConfigObject([{ AET: "CRASH", Labels: ["crash"] }], orthanc.url, { Gateway: { SpoolDirectory: spool, Log: { Level: "info", Format: "json" } } });
  const configPath = writeConfigFile(config);
  const port = firstTenantPort(config);
  const start = () => {
    const g = serveFromSource(configPath);
    gateways.push(g);
    return g;
  };

  const first = start();
  await first.waitForLine(/"HTTP endpoint started"/);

  // storescu sends all files on one association; after 100 acknowledgements the gateway is SIGKILLed.
  const acked: string[] = [];
  let current = "";
  let killed = false;
  const scu = spawn("storescu", ["-v", "-aet", "MODALITY", "-aec", "CRASH", "127.0.0.1", String(port), ...files], { env: DCMTK_ENV });
  let buf = "";
  const onLine = (line: string) => {
    const sending = line.match(/Sending file: (\S+)/);
    if (sending) current = sending[1]!;
    if (line.includes("Received Store Response (Success)")) {
      acked.push(current);
      if (acked.length === 100 && !killed) {
        killed = true;
        first.child.kill("SIGKILL");
      }
    }
  };
  const consume = (d: Buffer) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      onLine(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
  };
  scu.stdout.on("data", consume);
  scu.stderr.on("data", consume);
  await new Promise((r) => scu.on("close", r));
  await first.exited;
  expect(killed).toBe(true);
  expect(acked.length).toBeGreaterThanOrEqual(100);
  expect(acked.length).toBeLessThan(N);

  // Restart on the same spool: the pending instances are replayed.
  const second = start();
  const httpPort = httpPortFromLog(await second.waitForLine(/"HTTP endpoint started"/));
  const deadline = Date.now() + 60_000;
  for (;;) {
    const s = (await (await fetch(`http://127.0.0.1:${httpPort}/status`)).json()) as { tenants: { spool: { depth: number } }[] };
    if (s.tenants[0]!.spool.depth === 0) break;
    if (Date.now() > deadline) throw new Error(`spool not drained: ${JSON.stringify(s.tenants[0])}`);
    await new Promise((r) => setTimeout(r, 100));
  }

  const client = new OrthancClient({ url: orthanc.url });
  const labeled = await client.postJson<string[]>("/tools/find", { Level: "Instance", Query: {}, Labels: ["crash"], LabelsConstraint: "All" });
  const all = await client.getJson<string[]>("/instances");
  // Every acknowledged instance is there and labeled; nothing is there twice; nothing unlabeled.
  const uids = new Set<string>();
  for (const id of labeled) uids.add((await client.getJson<{ MainDicomTags: { SOPInstanceUID: string } }>(`/instances/${id}`)).MainDicomTags.SOPInstanceUID);
  expect(uids.size).toBe(labeled.length);
  for (const f of acked) expect(uids.has(await tagValue(f, "0008,0018"))).toBe(true);
  expect(all.length).toBe(labeled.length);
  expect(labeled.length).toBeLessThanOrEqual(N);
  expect((await second.stop())).toBe(0);
}, 120_000);
