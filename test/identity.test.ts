/**
 * What identifies an instance, end to end through the gateway (issue: never lose or misfile an
 * acknowledged image): non-ASCII PatientIDs in national character sets arrive in Orthanc labeled and are
 * never quarantined, in Spool and Sync mode, sent by dcmtk's storescu; pydicom's character-set files too;
 * data sets that Orthanc would read differently from the gateway (a repeated or out-of-order top-level
 * element, sent raw: storescu would re-encode them) are refused before any acknowledgement and nothing of
 * them reaches Orthanc.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { CommandField, Status, TransferSyntax } from "../src/net/constants.ts";
import { encodeFileMeta, explicitVrElement } from "../src/dicom/part10.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { runTool } from "./helpers/dcmtk.ts";
import { tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { getSharedOrthanc } from "./helpers/orthanc.ts";
import { PYDICOM_CHARSET_FILES } from "./helpers/pydicom-datasets.ts";
import { concat, RawPeer } from "./helpers/raw-peer.ts";
import { tempDir } from "./helpers/temp.ts";

let client: OrthancClient;
let gw: Awaited<ReturnType<typeof startTestGateway>>;

const SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7";
const uid = () => `2.25.${BigInt("0x" + crypto.randomUUID().replace(/-/g, "")).toString()}`;
const ascii = (s: string) => new TextEncoder().encode(s);
const even = (b: Uint8Array, pad: number) => (b.length % 2 ? concat(b, Uint8Array.of(pad)) : b);
const ESC = 0x1b;

interface Charset {
  name: string;
  specificCharacterSet: string;
  /** PatientID and PatientName as their bytes in that character set. */
  patientId: Uint8Array;
  patientName: Uint8Array;
}

const CHARSETS: Charset[] = [
  { name: "UTF-8", specificCharacterSet: "ISO_IR 192", patientId: ascii("PÜ-192"), patientName: ascii("Müller^Jürgen") },
  { name: "UTF-8 Greek", specificCharacterSet: "ISO_IR 192", patientId: ascii("ΠΩ-192"), patientName: ascii("Διονυσιος") },
  { name: "UTF-8 Japanese", specificCharacterSet: "ISO_IR 192", patientId: ascii("山田-192"), patientName: ascii("山田^太郎") },
  { name: "Latin-1", specificCharacterSet: "ISO_IR 100", patientId: Uint8Array.of(0x50, 0xdc, ...ascii("-100")), patientName: Uint8Array.of(...ascii("M"), 0xfc, ...ascii("ller")) },
  { name: "Cyrillic", specificCharacterSet: "ISO_IR 144", patientId: Uint8Array.of(0xbf, 0xc6, ...ascii("-144")), patientName: Uint8Array.of(0xbb, 0xee, 0xdd, 0xd8, 0xdd) },
  { name: "Greek", specificCharacterSet: "ISO_IR 126", patientId: Uint8Array.of(0xd0, 0xd9, ...ascii("-126")), patientName: Uint8Array.of(0xc4, 0xe9, 0xef) },
  { name: "GB18030", specificCharacterSet: "GB18030", patientId: Uint8Array.of(0xd6, 0xd0, 0xce, 0xc4, ...ascii("-18030")), patientName: Uint8Array.of(0xcd, 0xf5, 0x5e, 0xd0, 0xa1) },
  {
    name: "ISO 2022 Japanese",
    specificCharacterSet: "\\ISO 2022 IR 87",
    patientId: Uint8Array.of(ESC, 0x24, 0x42, 0x3b, 0x33, 0x45, 0x44, ESC, 0x28, 0x42, ...ascii("-87")),
    patientName: Uint8Array.of(ESC, 0x24, 0x42, 0x3b, 0x33, 0x45, 0x44, ESC, 0x28, 0x42, 0x5e, ESC, 0x24, 0x42, 0x42, 0x40, 0x4f, 0x3a, ESC, 0x28, 0x42),
  },
];

/** A minimal Secondary Capture data set in explicit VR little endian, elements in ascending order. */
function dataset(c: Charset, uids: { study: string; series: string; sop: string }): Uint8Array {
  return concat(
    explicitVrElement(0x0008, 0x0005, "CS", even(ascii(c.specificCharacterSet), 0x20)),
    explicitVrElement(0x0008, 0x0016, "UI", even(ascii(SECONDARY_CAPTURE), 0)),
    explicitVrElement(0x0008, 0x0018, "UI", even(ascii(uids.sop), 0)),
    explicitVrElement(0x0008, 0x0060, "CS", ascii("OT")),
    explicitVrElement(0x0010, 0x0010, "PN", even(c.patientName, 0x20)),
    explicitVrElement(0x0010, 0x0020, "LO", even(c.patientId, 0x20)),
    explicitVrElement(0x0020, 0x000d, "UI", even(ascii(uids.study), 0)),
    explicitVrElement(0x0020, 0x000e, "UI", even(ascii(uids.series), 0)),
  );
}

function part10(ds: Uint8Array, sop: string): string {
  const file = join(tempDir("gw-charset-"), "instance.dcm");
  writeFileSync(file, concat(encodeFileMeta({ sopClassUid: SECONDARY_CAPTURE, sopInstanceUid: sop, transferSyntaxUid: TransferSyntax.ExplicitVRLittleEndian }), ds));
  return file;
}

async function storescu(aet: string, files: string[]) {
  return runTool("storescu", ["-v", "-aet", "MODALITY", "-aec", aet, "127.0.0.1", String(gw.portOf(aet)), ...files], { timeoutMs: 60_000 });
}

async function lookup(u: string, type: string): Promise<string | undefined> {
  return (await client.postJson<{ ID: string; Type: string }[]>("/tools/lookup", u)).find((r) => r.Type === type)?.ID;
}

async function quarantined(): Promise<number> {
  const s = (await (await fetch(gw.httpUrl + "/status")).json()) as { tenants: { spool: { quarantined: number } }[] };
  return s.tenants.reduce((n, t) => n + t.spool.quarantined, 0);
}

beforeAll(async () => {
  const orthanc = await getSharedOrthanc();
  client = new OrthancClient({ url: orthanc.url });
  gw = await startTestGateway(
    [
      { AET: "CSSPOOL", Labels: ["cs-spool"] },
      { AET: "CSSYNC", Labels: ["cs-sync"], Forwarding: "Sync" },
      { AET: "DUPVICTIM", Labels: ["dup-victim"] },
      { AET: "DUPATTACK", Labels: ["dup-attack"] },
      { AET: "DUPSHARED", Labels: ["dup-shared"], Isolation: "Shared" },
    ],
    orthanc.url,
  );
}, 120_000);

afterAll(async () => {
  await gw?.stop();
});

describe("non-ASCII PatientIDs in national character sets", () => {
  for (const aet of ["CSSPOOL", "CSSYNC"]) {
    test(`${aet}: every character set arrives in Orthanc, labeled, none quarantined`, async () => {
      const sent: { name: string; sop: string; study: string }[] = [];
      const files: string[] = [];
      for (const c of CHARSETS) {
        const uids = { study: uid(), series: uid(), sop: uid() };
        files.push(part10(dataset(c, uids), uids.sop));
        sent.push({ name: c.name, sop: uids.sop, study: uids.study });
      }
      const r = await storescu(aet, files);
      expect(r.code).toBe(0);
      expect(r.output.match(/Received Store Response \(Success\)/g)?.length).toBe(CHARSETS.length);
      await gw.forwarder.idle();
      const label = aet === "CSSPOOL" ? "cs-spool" : "cs-sync";
      for (const s of sent) {
        const instance = await lookup(s.sop, "Instance");
        const study = await lookup(s.study, "Study");
        expect(`${s.name}: ${instance !== undefined && study !== undefined}`).toBe(`${s.name}: true`);
        expect(`${s.name}: ${await client.getJson<string[]>(`/instances/${instance}/labels`)}`).toBe(`${s.name}: ${label}`);
        expect(`${s.name}: ${await client.getJson<string[]>(`/studies/${study}/labels`)}`).toBe(`${s.name}: ${label}`);
      }
      expect(await quarantined()).toBe(0);
    });
  }

  test("pydicom's character-set files (unique copies) arrive labeled, none quarantined", async () => {
    // chrSQEncoding*.dcm are fragments without SOP Class UID: not instances a modality could send (storescu refuses them).
    const sources = readdirSync(PYDICOM_CHARSET_FILES).filter((f) => f.endsWith(".dcm") && !f.startsWith("chrSQEncoding"));
    const files: string[] = [];
    for (const f of sources) files.push(...(await uniqueCopies(join(PYDICOM_CHARSET_FILES, f), 1, { newStudy: true })));
    const r = await runTool("storescu", ["-v", "-aet", "MODALITY", "-aec", "CSSPOOL", "127.0.0.1", String(gw.portOf("CSSPOOL")), ...files], { timeoutMs: 60_000 });
    expect(r.output.match(/Received Store Response \(Success\)/g)?.length).toBe(files.length);
    await gw.forwarder.idle();
    for (const [i, f] of files.entries()) {
      const instance = await lookup(await tagValue(f, "0008,0018"), "Instance");
      expect(`${sources[i]}: ${instance ? await client.getJson<string[]>(`/instances/${instance}/labels`) : "missing"}`).toBe(`${sources[i]}: cs-spool`);
    }
    expect(await quarantined()).toBe(0);
  });
});

describe("data sets Orthanc would read differently are refused before any acknowledgement", () => {
  const CONTEXT = { id: 1, abstractSyntax: SECONDARY_CAPTURE, transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] };

  async function sendRaw(aet: string, sop: string, ds: Uint8Array) {
    const peer = await RawPeer.connect(gw.portOf(aet));
    await peer.associate(aet, [CONTEXT]);
    peer.sendCommand(1, { commandField: CommandField.CStoreRQ, messageId: 1, affectedSopClassUid: SECONDARY_CAPTURE, affectedSopInstanceUid: sop, priority: 0, commandDataSetType: 0 }, ds);
    const rsp = await peer.readCommand();
    peer.close();
    return rsp;
  }

  const el = (group: number, element: number, vr: string, value: string, pad = 0x20) => explicitVrElement(group, element, vr, even(ascii(value), pad));

  test("a repeated PatientID (the victim's first, as DCMTK reads it) and out-of-order elements: 0xC000 naming the element; nothing in Orthanc; the victim's study untouched", async () => {
    const study = uid();
    const series = uid();
    const victimSop = uid();
    const victim = concat(el(0x0008, 0x0016, "UI", SECONDARY_CAPTURE, 0), el(0x0008, 0x0018, "UI", victimSop, 0), el(0x0010, 0x0020, "LO", "DUP-VICTIM"), el(0x0020, 0x000d, "UI", study, 0), el(0x0020, 0x000e, "UI", series, 0));
    expect((await sendRaw("DUPVICTIM", victimSop, victim))?.status).toBe(Status.Success);
    await gw.forwarder.idle();
    const studyId = await lookup(study, "Study");
    const instancesBefore = await client.getJson<string[]>(`/studies/${studyId}/instances`);

    const attacks: [string, (sop: string) => Uint8Array, RegExp][] = [
      [
        "repeated PatientID",
        (sop) => concat(el(0x0008, 0x0016, "UI", SECONDARY_CAPTURE, 0), el(0x0008, 0x0018, "UI", sop, 0), el(0x0010, 0x0020, "LO", "DUP-VICTIM"), el(0x0010, 0x0020, "LO", "DUP-ATTACK"), el(0x0020, 0x000d, "UI", study, 0), el(0x0020, 0x000e, "UI", uid(), 0)),
        /\(0010,0020\)/,
      ],
      [
        "PatientID after the Study Instance UID",
        (sop) => concat(el(0x0008, 0x0016, "UI", SECONDARY_CAPTURE, 0), el(0x0008, 0x0018, "UI", sop, 0), el(0x0020, 0x000d, "UI", study, 0), el(0x0010, 0x0020, "LO", "DUP-VICTIM"), el(0x0020, 0x000e, "UI", uid(), 0)),
        /\(0010,0020\)/,
      ],
    ];
    for (const aet of ["DUPATTACK", "DUPSHARED"]) {
      for (const [what, make, names] of attacks) {
        const sop = uid();
        const rsp = await sendRaw(aet, sop, make(sop));
        expect(`${aet} ${what}: ${rsp?.status?.toString(16)}`).toBe(`${aet} ${what}: c000`);
        expect(rsp?.errorComment).toMatch(names);
        expect(rsp!.errorComment!.length).toBeLessThanOrEqual(64);
        await gw.forwarder.idle();
        expect(await lookup(sop, "Instance")).toBeUndefined();
      }
    }
    expect(await client.getJson<string[]>(`/studies/${studyId}/instances`)).toEqual(instancesBefore);
    expect(await client.getJson<string[]>(`/studies/${studyId}/labels`)).toEqual(["dup-victim"]);
    expect(await quarantined()).toBe(0);
  });
});
