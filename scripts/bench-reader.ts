/**
 * Micro-benchmark of the strict data set reader (src/dicom/dataset-reader.ts), which runs on every
 * C-STORE in the receive path: throughput and time per chunk for
 *   - a real 38 KiB CT slice (pydicom's CT_small.dcm), read many times;
 *   - a 1 GiB native Pixel Data instance, generated in memory chunk by chunk (one reused buffer);
 *   - a multi-frame JPEG instance with many fragments (encapsulated Pixel Data, PS3.5 A.4);
 *   - the same CT deflated (PS3.5 A.5), for the cost of streaming inflate.
 * Chunks are 16 KiB, the size of the P-DATA values a peer sends with the default MaximumPduLength.
 *
 * Usage: bun scripts/bench-reader.ts [--chunk BYTES] [--rounds N]
 */
import { readFileSync } from "node:fs";
import { deflateRawSync } from "node:zlib";
import { InstanceReader } from "../src/dicom/dataset-reader.ts";
import { decodeFileMeta, fileMetaLength } from "../src/dicom/part10.ts";
import { concat, element, encapsulatedPixelData, identityDataset, text, TS } from "../test/helpers/dicom-build.ts";
import { pydicomFile } from "../test/helpers/dicom-files.ts";

const args = process.argv.slice(2);
const opt = (name: string, def: number) => {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : def;
};
const CHUNK = opt("--chunk", 16 * 1024);
const ROUNDS = opt("--rounds", 3);
const OPTS = { defaultEncoding: "Latin1" };

interface Result {
  bytes: number;
  chunks: number;
  ms: number;
}

/** Feeds `source` (a generator of chunks) to a fresh reader `times` times; the median round's timing. */
async function measure(label: string, times: number, ts: string, source: () => Iterable<Uint8Array>): Promise<void> {
  const rounds: Result[] = [];
  for (let r = 0; r < ROUNDS + 1; r++) {
    let bytes = 0;
    let chunks = 0;
    const started = performance.now();
    for (let t = 0; t < times; t++) {
      const reader = new InstanceReader(ts, OPTS);
      for (const c of source()) {
        const p = reader.push(c);
        if (p) await p;
        bytes += c.length;
        chunks++;
      }
      await reader.end();
    }
    if (r > 0) rounds.push({ bytes, chunks, ms: performance.now() - started }); // round 0 warms up
  }
  rounds.sort((a, b) => a.ms - b.ms);
  const m = rounds[rounds.length >> 1]!;
  const mbs = m.bytes / 1e6 / (m.ms / 1000);
  const perChunk = (m.ms * 1000) / m.chunks;
  process.stdout.write(`${label.padEnd(52)} ${(m.bytes / 1e6).toFixed(1).padStart(8)} MB ${String(m.chunks).padStart(8)} chunks ${mbs.toFixed(0).padStart(8)} MB/s ${perChunk.toFixed(2).padStart(7)} µs/chunk\n`);
}

function* chunked(b: Uint8Array): Iterable<Uint8Array> {
  for (let o = 0; o < b.length; o += CHUNK) yield b.subarray(o, o + CHUNK);
}

// 1. The real CT slice.
const ctFile = new Uint8Array(readFileSync(pydicomFile("CT_small.dcm")));
const ct = ctFile.subarray(fileMetaLength(ctFile)!);
const ctTs = decodeFileMeta(ctFile).transferSyntaxUid;

// 2. 1 GiB of native Pixel Data after a real header, from one reused chunk.
const GIB = 1 << 30;
const head = identityDataset("explicitLE", { studyInstanceUid: "1.2.3.1", seriesInstanceUid: "1.2.3.2", sopInstanceUid: "1.2.3.3", patientId: text("BIG"), specificCharacterSet: text("ISO_IR 100") }, [element("explicitLE", 0x00280010, "US", Uint8Array.of(0, 2)), element("explicitLE", 0x7fe00010, "OW", new Uint8Array(0), GIB)]);
const zeros = new Uint8Array(CHUNK);
function* bigInstance(): Iterable<Uint8Array> {
  yield head;
  for (let left = GIB; left > 0; left -= CHUNK) yield left >= CHUNK ? zeros : zeros.subarray(0, left);
}

// 3. A multi-frame JPEG: 4000 fragments of 1-12 KiB (frame sizes vary) with a Basic Offset Table.
let seed = 7;
const rnd = () => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);
const fragments = Array.from({ length: 4000 }, () => new Uint8Array(2 * Math.floor(512 + rnd() * 5632)));
const offsets: number[] = [];
let off = 0;
for (const f of fragments) offsets.push(off), (off += f.length + 8);
const jpeg = concat([identityDataset("explicitLE", { studyInstanceUid: "1.2.3.1", seriesInstanceUid: "1.2.3.2", sopInstanceUid: "1.2.3.3", patientId: text("JPEG") }), encapsulatedPixelData(fragments, offsets)]);

// 4. The CT deflated.
const ctDeflated = deflateRawSync(ct);

process.stdout.write(`strict reader, ${CHUNK}-byte chunks, median of ${ROUNDS} rounds (${typeof Bun !== "undefined" ? `Bun ${Bun.version}` : `Node ${process.version}`})\n`);
await measure(`CT slice, ${(ct.length / 1024).toFixed(0)} KiB, 2000 instances`, 2000, ctTs, () => chunked(ct));
await measure("1 GiB native Pixel Data, 1 instance", 1, TS.explicitLE, bigInstance);
await measure(`multi-frame JPEG, 4000 fragments (${(jpeg.length / 1048576).toFixed(1)} MiB), 10 instances`, 10, TS.jpegBaseline, () => chunked(jpeg));
await measure(`CT slice deflated (${(ctDeflated.length / 1024).toFixed(0)} KiB), 500 instances`, 500, TS.deflated, () => chunked(ctDeflated));
