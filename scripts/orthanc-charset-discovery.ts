/**
 * Discovery of how the real Orthanc (the test bed's Debian Orthanc 1.12.7: DCMTK 3.6.9, boost::locale over
 * glibc iconv and ICU) reads PatientID, compared with the gateway's model (src/dicom/orthanc-text.ts):
 * instances with chosen PatientID bytes under every Specific Character Set term Orthanc knows (and a few
 * it does not), every single byte, every character of the 94x94 sets used in ISO 2022 code extensions
 * (JIS X 0208, JIS X 0212, KS X 1001, GB 2312), every two-byte GB18030 code and a sample of the four-byte
 * ones, padding/space/NUL/backslash/control edge cases, UN and SH encodings, and data sets without
 * (0008,0005) under several DefaultEncoding settings.
 *
 * For every value the model accepts, Orthanc's resource IDs must be the SHA-1 of the model's string
 * (uploads are batched: many characters per PatientID, bisected on a mismatch). For values the model
 * refuses as uncertain, a sample is uploaded one by one and Orthanc's reading printed next to what a
 * WHATWG TextDecoder would say: the evidence that the outcome depends on the converter.
 *
 * Usage: bun scripts/orthanc-charset-discovery.ts [--quick] [--section terms|tables|edges|defaults]...
 *   --quick   a stride sample of the large tables instead of every code (~10 s instead of ~1 min)
 * Exit status 1 when any accepted value is filed by Orthanc elsewhere than the model says.
 */
import { startOrthanc, type OrthancHandle } from "./orthanc-testbed.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { DatasetRefusal, patientIdAsOrthanc } from "../src/dicom/dataset-reader.ts";
import { detectEncoding, orthancEncodingByName } from "../src/dicom/orthanc-text.ts";
import { bytes, concat, latin1 } from "../test/helpers/dicom-build.ts";
import { hexBytes, orthancPatientId, probe, show, type ProbeCase } from "../test/helpers/identity-probe.ts";
import { edgeCases, singleByteTerms, tableFamilies, type Family } from "../test/helpers/charset-corpus.ts";

const args = process.argv.slice(2);
const quick = args.includes("--quick");
const sections = args.flatMap((a, i) => (args[i - 1] === "--section" ? [a] : []));
const want = (s: string) => sections.length === 0 || sections.includes(s);

let mismatches = 0;
const log = (s: string) => process.stdout.write(`${s}\n`);

/** The model's verdict on a PatientID value: the string Orthanc should hash, or why it is refused. */
function model(value: Uint8Array, charset: Uint8Array | undefined, defaultEncoding: string): { ok: true; text: string } | { ok: false; why: string } {
  try {
    return { ok: true, text: patientIdAsOrthanc(value, detectEncoding(charset, orthancEncodingByName(defaultEncoding)!), charset) };
  } catch (e) {
    if (!(e instanceof DatasetRefusal)) throw e;
    return { ok: false, why: e.reason };
  }
}

/** Checks a family: batches of accepted items (bisected on mismatch), and a sample of the refused ones. */
async function checkFamily(client: OrthancClient, f: Family, defaultEncoding: string, sampleRefused = 12): Promise<void> {
  const wrap = (items: Uint8Array[]) => concat([f.prefix ?? new Uint8Array(0), ...items, f.suffix ?? new Uint8Array(0)]);
  const accepted: Uint8Array[] = [];
  const refused: Uint8Array[] = [];
  for (const item of f.items) (model(wrap([item]), f.charset, defaultEncoding).ok ? accepted : refused).push(item);
  let uploads = 0;
  const bad: string[] = [];
  const check = async (group: Uint8Array[][]): Promise<void> => {
    const cases: ProbeCase[] = group.map((g) => ({ label: f.name, charset: f.charset, patientId: even(wrap(g)) }));
    uploads += cases.length;
    const results = await probe(client, cases, defaultEncoding);
    const retry: Uint8Array[][] = [];
    for (let i = 0; i < results.length; i++) {
      const r = results[i]!;
      if (r.agrees) continue;
      const g = group[i]!;
      if (g.length > 1) {
        retry.push(g.slice(0, g.length >> 1), g.slice(g.length >> 1));
        continue;
      }
      const m = "identity" in r.model ? show(r.model.identity.patientId) : `refused: ${r.model.refusal.comment}`;
      const o = "ids" in r.orthanc ? show(await orthancPatientId(client, r.orthanc.ids.patient)) : r.orthanc.error;
      bad.push(`${hexBytes(g[0])}: model "${m}", Orthanc "${o}"`);
    }
    if (retry.length) await check(retry);
  };
  const batches: Uint8Array[][] = [];
  for (let i = 0; i < accepted.length; i += f.batch) batches.push(accepted.slice(i, i + f.batch));
  await check(batches);
  // Evidence for the refused ones: what Orthanc makes of them followed by "|A", next to a WHATWG decoder's reading.
  const samples = sample(refused, sampleRefused).map((s) => concat([s, latin1("|A")]));
  const evidence: string[] = [];
  const results = await probe(client, samples.map((s) => ({ label: f.name, charset: f.charset, patientId: even(wrap([s])) })), defaultEncoding);
  for (let i = 0; i < results.length; i++) {
    const r = results[i]!;
    const o = "ids" in r.orthanc ? `"${show(await orthancPatientId(client, r.orthanc.ids.patient))}"` : `error ${r.orthanc.error.slice(0, 60)}`;
    const naive = f.whatwg ? ` (WHATWG ${f.whatwg}: "${show(new TextDecoder(f.whatwg).decode(wrap([samples[i]!])))}")` : "";
    evidence.push(`${hexBytes(samples[i])} -> ${o}${naive}`);
  }
  mismatches += bad.length;
  log(`${f.name}: ${accepted.length - bad.length} agree (${uploads} uploads), ${bad.length} MISMATCH, ${refused.length} refused as uncertain`);
  for (const b of bad) log(`    MISMATCH ${b}`);
  if (evidence.length) log(`    refused, Orthanc reads: ${evidence.join("; ")}`);
}

function even(b: Uint8Array): Uint8Array {
  return b.length % 2 ? concat([b, bytes(0x20)]) : b;
}

function sample<T>(xs: T[], n: number): T[] {
  if (xs.length <= n) return xs;
  const step = xs.length / n;
  return Array.from({ length: n }, (_, i) => xs[Math.floor(i * step)]!);
}

async function checkEdges(client: OrthancClient, cases: ProbeCase[], defaultEncoding: string): Promise<void> {
  const results = await probe(client, cases, defaultEncoding);
  let agree = 0;
  let refusedCount = 0;
  for (const r of results) {
    if (r.agrees) {
      agree++;
      continue;
    }
    const o = "ids" in r.orthanc ? `"${show(await orthancPatientId(client, r.orthanc.ids.patient))}"` : `error: ${r.orthanc.error.slice(0, 80)}`;
    if ("refusal" in r.model) {
      refusedCount++;
      log(`    refused  ${r.case.label}: ${r.model.refusal.comment} — Orthanc reads ${o}`);
    } else {
      mismatches++;
      log(`    MISMATCH ${r.case.label}: model "${show(r.model.identity.patientId)}", Orthanc ${o}`);
    }
  }
  log(`edge cases (DefaultEncoding ${defaultEncoding}): ${agree} agree, ${refusedCount} refused, ${results.length - agree - refusedCount} MISMATCH`);
}

async function withOrthanc<T>(defaultEncoding: string | undefined, f: (client: OrthancClient) => Promise<T>): Promise<T> {
  const o: OrthancHandle = await startOrthanc(defaultEncoding ? { extraConfig: { DefaultEncoding: defaultEncoding } } : {});
  const client = new OrthancClient({ url: o.url, timeoutMs: 30_000 });
  try {
    return await f(client);
  } finally {
    client.close();
    await o.stop();
  }
}

const started = performance.now();
await withOrthanc(undefined, async (client) => {
  const version = (await client.system()).Version;
  log(`Orthanc ${version} (DefaultEncoding Latin1)`);
  if (want("terms")) for (const f of singleByteTerms()) await checkFamily(client, f, "Latin1");
  if (want("tables")) for (const f of tableFamilies(quick)) await checkFamily(client, f, "Latin1", 8);
  if (want("edges")) await checkEdges(client, edgeCases(), "Latin1");
});
if (want("defaults")) {
  for (const enc of ["Utf8", "Ascii", "Latin2", "Latin5", "Cyrillic", "Windows1251", "Arabic", "Greek", "Hebrew", "Thai", "Japanese", "Chinese", "Korean", "JapaneseKanji", "SimplifiedChinese"]) {
    await withOrthanc(enc, async (client) => {
      const single = Array.from({ length: 255 }, (_, i) => bytes(i + 1));
      await checkFamily(client, { name: `no (0008,0005), DefaultEncoding ${enc}`, items: single, batch: 64 }, enc, 4);
      await checkFamily(client, { name: `empty (0008,0005), DefaultEncoding ${enc}`, charset: latin1("  "), items: single, batch: 64 }, enc, 0);
    });
  }
}
log(`${mismatches === 0 ? "no mismatch" : `${mismatches} MISMATCHES`} (${((performance.now() - started) / 1000).toFixed(1)} s)`);
process.exit(mismatches === 0 ? 0 : 1);
