/**
 * Strict isolation against an Orthanc with `OverwriteInstances: true` (a common setting): an attacker
 * tenant re-sending a victim's SOP Instance UID — as it is, under another PatientID, in Spool and Sync
 * mode — must neither overwrite the victim's instance nor make the gateway delete it.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { startOrthanc, type OrthancHandle } from "../scripts/orthanc-testbed.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { runTool } from "./helpers/dcmtk.ts";
import { pydicomFile, tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { startTestGateway } from "./helpers/gateway.ts";

let orthanc: OrthancHandle;
let client: OrthancClient;
let gw: Awaited<ReturnType<typeof startTestGateway>>;

const uid = () => `2.25.${BigInt("0x" + crypto.randomUUID().replace(/-/g, "")).toString()}`;

async function instance(tags: Record<string, string>): Promise<string> {
  const [f] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1);
  const args = Object.entries({ "(0020,000d)": uid(), "(0020,000e)": uid(), ...tags }).flatMap(([t, v]) => ["-i", `${t}=${v}`]);
  const r = await runTool("dcmodify", ["-nb", ...args, f!]);
  if (r.code !== 0) throw new Error(r.output);
  return f!;
}

function storescu(aet: string, files: string[]) {
  return runTool("storescu", ["-d", "-aet", "MODALITY", "-aec", aet, "127.0.0.1", String(gw.portOf(aet)), ...files], { timeoutMs: 60_000 });
}

/** The DIMSE status of the (last) C-STORE response storescu printed. */
async function storeStatus(aet: string, file: string): Promise<string | undefined> {
  return (await storescu(aet, [file])).output.match(/DIMSE Status\s+: (0x[0-9a-f]+)/g)?.at(-1)?.slice(-6);
}

interface InstanceInfo {
  ID: string;
  ParentSeries: string;
  FileUuid?: string;
}

beforeAll(async () => {
  orthanc = await startOrthanc({ extraConfig: { OverwriteInstances: true } });
  client = new OrthancClient({ url: orthanc.url });
  gw = await startTestGateway(
    [
      { AET: "VICTIM", Labels: ["victim"] },
      { AET: "SPOOLATT", Labels: ["attacker"] },
      { AET: "SYNCATT", Labels: ["attacker2"], Forwarding: "Sync" },
    ],
    orthanc.url,
  );
}, 120_000);

afterAll(async () => {
  await gw?.stop();
  await orthanc?.stop();
}, 30_000);

describe("OverwriteInstances: true", () => {
  test("re-sending the victim's SOP Instance UID (as it is, or under another PatientID/study) is refused before any upload; the victim's only instance stays intact", async () => {
    const victim = await instance({ "(0010,0020)": "OVW-VICTIM" });
    expect(await storeStatus("VICTIM", victim)).toBe("0x0000");
    await gw.forwarder.idle();
    const sop = await tagValue(victim, "0008,0018");
    const [found] = await client.postJson<{ ID: string }[]>("/tools/lookup", sop);
    const before = await client.getJson<InstanceInfo>(`/instances/${found!.ID}`);
    const md5Of = async (id: string) => (await client.request("GET", `/instances/${id}/attachments/dicom/md5`)).text();
    const md5 = await md5Of(found!.ID);

    const asItIs = await instance({ "(0010,0020)": "OVW-VICTIM", "(0020,000d)": await tagValue(victim, "0020,000d"), "(0020,000e)": await tagValue(victim, "0020,000e"), "(0008,0018)": sop, "(0010,0010)": "OVERWRITTEN^BY^ATTACKER" });
    const otherPatient = await instance({ "(0010,0020)": "OVW-ATTACKER", "(0008,0018)": sop });
    for (const aet of ["SPOOLATT", "SYNCATT"]) {
      for (const f of [asItIs, otherPatient]) {
        expect(`${aet}: ${await storeStatus(aet, f)}`).toBe(`${aet}: 0x0124`);
      }
    }
    await gw.forwarder.idle();
    const after = await client.getJson<InstanceInfo>(`/instances/${found!.ID}`);
    expect(after.ParentSeries).toBe(before.ParentSeries);
    expect(await md5Of(found!.ID)).toBe(md5);
    expect((await client.getJson<string[]>(`/instances/${found!.ID}/labels`)).sort()).toEqual(["victim"]);
    expect((await client.getJson<{ PatientName?: string }>(`/instances/${found!.ID}/simplified-tags`)).PatientName).not.toContain("ATTACKER");
    // Still one instance with that UID in Orthanc: nothing was uploaded under the attacker's PatientID either.
    expect((await client.postJson<unknown[]>("/tools/lookup", sop)).length).toBe(1);
  });

  test("the tenant re-sending its own only instance: Orthanc overwrites it and drops its labels (and the study's); the gateway labels it again", async () => {
    const mine = await instance({ "(0010,0020)": "OVW-OWN" });
    expect(await storeStatus("VICTIM", mine)).toBe("0x0000");
    await gw.forwarder.idle();
    expect(await storeStatus("VICTIM", mine)).toBe("0x0000");
    await gw.forwarder.idle();
    const [found] = await client.postJson<{ ID: string }[]>("/tools/lookup", await tagValue(mine, "0008,0018"));
    const inst = await client.getJson<InstanceInfo>(`/instances/${found!.ID}`);
    const series = await client.getJson<{ ParentStudy: string }>(`/series/${inst.ParentSeries}`);
    expect(await client.getJson<string[]>(`/instances/${found!.ID}/labels`)).toEqual(["victim"]);
    expect(await client.getJson<string[]>(`/series/${inst.ParentSeries}/labels`)).toEqual(["victim"]);
    expect(await client.getJson<string[]>(`/studies/${series.ParentStudy}/labels`)).toEqual(["victim"]);
  });
});
