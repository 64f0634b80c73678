/**
 * Never delete what this gateway did not create: when Orthanc's answer to an upload names another place
 * than the one the gateway checked (its reading of the data set and Orthanc's differ — a bug the strict
 * reader exists to prevent, simulated here by rewriting Orthanc's answer in a proxy), the upload is undone
 * only if Orthanc stored a new instance that was not there before; otherwise it is left as it is. Either
 * way the spool record is quarantined (reason "placement"), counted and audited.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { getSharedOrthanc, type OrthancHandle } from "./helpers/orthanc.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { runTool } from "./helpers/dcmtk.ts";
import { pydicomFile, tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { startRewritingProxy, type RewritingProxy } from "./helpers/http-proxy.ts";

let orthanc: OrthancHandle;
let client: OrthancClient;
let proxy: RewritingProxy;
let gw: Awaited<ReturnType<typeof startTestGateway>>;

const ELSEWHERE = "00000000-11111111-22222222-33333333-44444444";

beforeAll(async () => {
  orthanc = await getSharedOrthanc();
  client = new OrthancClient({ url: orthanc.url });
  proxy = await startRewritingProxy(orthanc.url);
  gw = await startTestGateway(
    [
      { AET: "PLACESPOOL", Labels: ["place-spool"] },
      { AET: "PLACESYNC", Labels: ["place-sync"], Forwarding: "Sync" },
    ],
    proxy.url,
  );
}, 120_000);

afterAll(async () => {
  await gw?.stop();
  await proxy?.close();
}, 30_000);

/**
 * From now on, Orthanc's answers to uploads say the instance went into another study (and, with
 * `status`, answer that status: "Success" is what an Orthanc with OverwriteInstances answers to a re-send).
 */
function misfileUploads(status?: string): () => void {
  return proxy.use({
    matches: (r) => r.method === "POST" && r.path === "/instances",
    response: (_r, a) => {
      const answer = JSON.parse(new TextDecoder().decode(a.body)) as Record<string, string>;
      return new TextEncoder().encode(JSON.stringify({ ...answer, ParentStudy: ELSEWHERE, ...(status ? { Status: status } : {}) }));
    },
  });
}

async function status(aet: string, file: string): Promise<string | undefined> {
  const r = await runTool("storescu", ["-d", "-aet", "MODALITY", "-aec", aet, "127.0.0.1", String(gw.portOf(aet)), file], { timeoutMs: 30_000 });
  return r.output.match(/DIMSE Status\s+: (0x[0-9a-f]+)/g)?.at(-1)?.slice(-6);
}

async function instanceIdOf(sop: string): Promise<string | undefined> {
  return (await client.postJson<{ ID: string; Type: string }[]>("/tools/lookup", sop)).find((r) => r.Type === "Instance")?.ID;
}

function auditLines(): Record<string, unknown>[] {
  return readFileSync(gw.config.audit!.file, "utf8").trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
}

test("Spool: a new instance filed elsewhere is deleted again (it was this upload's) and quarantined", async () => {
  const [f] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true });
  const sop = await tagValue(f!, "0008,0018");
  const stop = misfileUploads();
  try {
    expect(await status("PLACESPOOL", f!)).toBe("0x0000");
    await gw.forwarder.idle();
  } finally {
    stop();
  }
  expect(await instanceIdOf(sop)).toBeUndefined();
  expect(auditLines().find((a) => a.event === "instance-misplaced" && a.sopInstanceUid === sop)).toMatchObject({ tenant: "PLACESPOOL", outcome: "deleted" });
  expect(auditLines().find((a) => a.event === "instance-quarantined" && a.sopInstanceUid === sop)).toMatchObject({ kind: "placement" });
  expect(await (await fetch(gw.httpUrl + "/metrics")).text()).toMatch(/dicom_gateway_quarantined_instances_total\{tenant="PLACESPOOL",reason="placement"\} 1/);
});

test("Spool: an instance that was already in Orthanc (a re-send, answered Success as with OverwriteInstances) is never deleted", async () => {
  const [f] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true });
  const sop = await tagValue(f!, "0008,0018");
  expect(await status("PLACESPOOL", f!)).toBe("0x0000");
  await gw.forwarder.idle();
  const id = await instanceIdOf(sop);
  expect(id).toBeDefined();
  const stop = misfileUploads("Success");
  try {
    expect(await status("PLACESPOOL", f!)).toBe("0x0000");
    await gw.forwarder.idle();
  } finally {
    stop();
  }
  expect(await instanceIdOf(sop)).toBe(id);
  expect(await client.getJson<string[]>(`/instances/${id}/labels`)).toEqual(["place-spool"]);
  expect(auditLines().find((a) => a.event === "instance-misplaced" && a.sopInstanceUid === sop)).toMatchObject({ outcome: "left" });
});

test("Sync: refused with 0x0110 and an ErrorComment; a new instance is undone, nothing acknowledged", async () => {
  const [f] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true });
  const sop = await tagValue(f!, "0008,0018");
  const stop = misfileUploads();
  try {
    const r = await runTool("storescu", ["-d", "-aet", "MODALITY", "-aec", "PLACESYNC", "127.0.0.1", String(gw.portOf("PLACESYNC")), f!], { timeoutMs: 30_000 });
    expect(r.output).toMatch(/DIMSE Status\s+: 0x0110/);
    expect(r.output).toContain("Orthanc filed it elsewhere than checked (see log)");
  } finally {
    stop();
  }
  expect(await instanceIdOf(sop)).toBeUndefined();
});
