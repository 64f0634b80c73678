/**
 * The one strict reader of a C-STORE data set: it checks the whole structure as the bytes arrive
 * (element-scanner.ts) and reads PatientID and the Study/Series/SOP Instance UIDs exactly as Orthanc will
 * (orthanc-text.ts), so that the gateway knows where Orthanc files an instance before acknowledging it,
 * and refuses what Orthanc could read differently from the gateway.
 *
 * The identity is known as soon as the top level passes (0020,000E) (`identity`, while the rest of the
 * data set still arrives: an Orthanc lookup can start); `end()` gives the verdict on the whole data set.
 *
 * Deflated data sets (PS3.5 A.5) are inflated as a stream (node:zlib), never held. What an attacker can
 * make this cost is bounded: the inflated bytes may not exceed `inflateLimit.floorBytes` plus
 * `inflateLimit.ratio` times the deflated bytes received so far (default 64 MiB + 64 x); beyond, the data
 * set is refused and inflation stops. zlib's own state is ~44 KiB; output is scanned 16 KiB at a time.
 */
import type { InflateRaw } from "node:zlib";
import { lazyBuiltin } from "../shared/builtin.ts";
import { isValidUid } from "./uids.ts";
import { transferSyntaxEncoding, VR, vrCode } from "./element-codec.ts";
import { ElementScanner, type CaptureSpec } from "./element-scanner.ts";
import { convertToUtf8, dcmtkUid, dcmtkValue, detectEncoding, encodingLabel, ORTHANC_MAX_STRING_BYTES, orthancEncodingByName, type DetectedEncoding, type OrthancEncoding } from "./orthanc-text.ts";
import { DatasetRefusal, RefusalStatus, tagName } from "./refusal.ts";

/** node:zlib, for deflated data sets only. */
const zlib = lazyBuiltin<typeof import("node:zlib")>("node:zlib");

export { DatasetRefusal, RefusalStatus } from "./refusal.ts";

/** Where Orthanc files an instance: the values its resource IDs hash (src/orthanc/identity.ts). */
export interface InstanceIdentity {
  /** PatientID exactly as Orthanc hashes it ("" when absent or empty). */
  patientId: string;
  studyInstanceUid: string;
  seriesInstanceUid: string;
  sopInstanceUid: string;
  /** The raw (0008,0005) value (bytes as Latin-1, padding removed), for logs and audit. */
  specificCharacterSet?: string;
}

export interface InstanceReaderOptions {
  /** Orthanc's `DefaultEncoding` (Latin1, Utf8, Ascii, ...): the character set of data sets without (0008,0005). */
  defaultEncoding: string;
  /** Bound on inflating deflated data sets (see the file header). */
  inflateLimit?: { floorBytes: number; ratio: number };
}

export const Tag = {
  SpecificCharacterSet: 0x00080005,
  SOPInstanceUID: 0x00080018,
  PatientID: 0x00100020,
  StudyInstanceUID: 0x0020000d,
  SeriesInstanceUID: 0x0020000e,
} as const;

/**
 * The elements read, their VRs and largest lengths (beyond: refused; LO allows 64 characters, UI 64, CS 16
 * per value, PS3.5 6.2). Explicit VR UN is accepted where Orthanc's reading of it is known (the raw value,
 * one trailing NUL removed: FromDcmtkBridge's UN branch). PatientID in any space-padded string VR reads as
 * LO does (checked against Orthanc); in UI, binary or numeric VRs it is refused.
 */
const TEXT_VRS = ["LO", "SH", "PN", "CS", "AE", "AS", "DA", "DS", "DT", "IS", "LT", "ST", "TM", "UC", "UR", "UT"].map(vrCode);
const CAPTURE = new Map<number, CaptureSpec>([
  [Tag.SpecificCharacterSet, { vrs: [VR.CS], maxLength: 256 }],
  [Tag.SOPInstanceUID, { vrs: [VR.UI, VR.UN], maxLength: 256 }],
  [Tag.PatientID, { vrs: [...TEXT_VRS, VR.UN], maxLength: 1024 }],
  [Tag.StudyInstanceUID, { vrs: [VR.UI, VR.UN], maxLength: 256 }],
  [Tag.SeriesInstanceUID, { vrs: [VR.UI, VR.UN], maxLength: 256 }],
]);

export const DEFAULT_INFLATE_LIMIT = { floorBytes: 64 << 20, ratio: 64 };

export class InstanceReader {
  /** The identity, as soon as the top level has passed (0020,000E); rejects with DatasetRefusal. */
  readonly identity: Promise<InstanceIdentity>;
  private resolveIdentity!: (i: InstanceIdentity) => void;
  private rejectIdentity!: (e: DatasetRefusal) => void;
  private readonly scanner: ElementScanner | undefined;
  private readonly inflater: Inflater | undefined;
  private readonly values = new Map<number, { value: Uint8Array; vr: number }>();
  private readonly defaultEncoding: OrthancEncoding;
  private result: InstanceIdentity | undefined;
  private refusal: DatasetRefusal | undefined;
  private ended = false;

  constructor(transferSyntaxUid: string, opts: InstanceReaderOptions) {
    const defaultEncoding = orthancEncodingByName(opts.defaultEncoding);
    if (!defaultEncoding) throw new RangeError(`DefaultEncoding "${opts.defaultEncoding}" is not one of Orthanc's encodings (Latin1, Utf8, Ascii, ...)`);
    this.defaultEncoding = defaultEncoding;
    this.identity = new Promise<InstanceIdentity>((resolve, reject) => {
      this.resolveIdentity = resolve;
      this.rejectIdentity = reject;
    });
    this.identity.catch(() => {}); // a caller that only awaits end() must not see an unhandled rejection
    const syntax = transferSyntaxEncoding(transferSyntaxUid);
    if (!syntax) {
      this.fail(new DatasetRefusal(RefusalStatus.CannotUnderstand, "Transfer syntax not readable by the gateway", `transfer syntax ${transferSyntaxUid} is not a DICOM transfer syntax the gateway can read`));
      return;
    }
    this.scanner = new ElementScanner({
      ...syntax,
      capture: CAPTURE,
      onValue: (tag, value, vr) => this.values.set(tag, { value, vr }),
      boundary: Tag.SeriesInstanceUID,
      onBoundary: () => this.settleIdentity(),
    });
    if (syntax.deflated) this.inflater = new Inflater((b) => this.scanner!.push(b), opts.inflateLimit ?? DEFAULT_INFLATE_LIMIT);
  }

  /** The next bytes of the data set. Throws (or, for deflated data sets, rejects with) DatasetRefusal. */
  push(chunk: Uint8Array): void | Promise<void> {
    if (this.refusal) throw this.refusal;
    if (this.ended) throw new Error("InstanceReader.push() after end()");
    if (this.inflater) return this.inflater.write(chunk).catch((e) => this.rethrow(e));
    try {
      this.scanner!.push(chunk);
    } catch (e) {
      this.rethrow(e);
    }
  }

  /** The verdict on the whole data set: its identity, or a DatasetRefusal. */
  async end(): Promise<InstanceIdentity> {
    if (this.refusal) throw this.refusal;
    this.ended = true;
    try {
      if (this.inflater) await this.inflater.finish();
      this.scanner!.finish();
    } catch (e) {
      this.rethrow(e);
    }
    if (this.refusal) throw this.refusal;
    return this.result!;
  }

  private rethrow(e: unknown): never {
    if (e instanceof DatasetRefusal) {
      this.fail(e);
      throw e;
    }
    throw e;
  }

  private fail(r: DatasetRefusal): void {
    this.refusal ??= r;
    this.rejectIdentity(this.refusal);
  }

  /** At the boundary (or the end): the identity, or the refusal of the whole data set. */
  private settleIdentity(): void {
    try {
      this.result = this.computeIdentity();
      this.resolveIdentity(this.result);
    } catch (e) {
      if (!(e instanceof DatasetRefusal)) throw e;
      this.fail(e);
      throw e;
    }
  }

  private computeIdentity(): InstanceIdentity {
    const charset = this.values.get(Tag.SpecificCharacterSet)?.value;
    const detected = detectEncoding(charset, this.defaultEncoding);
    const sopInstanceUid = this.uid(Tag.SOPInstanceUID, "SOP Instance UID");
    const studyInstanceUid = this.uid(Tag.StudyInstanceUID, "Study Instance UID");
    const seriesInstanceUid = this.uid(Tag.SeriesInstanceUID, "Series Instance UID");
    const pid = this.values.get(Tag.PatientID);
    const patientId = pid === undefined ? "" : patientIdAsOrthanc(pid.value, detected, charset, pid.vr === VR.UN);
    return {
      patientId,
      studyInstanceUid,
      seriesInstanceUid,
      sopInstanceUid,
      ...(charset ? { specificCharacterSet: latin1(dcmtkValue(charset, 0x20)) } : {}),
    };
  }

  private uid(tag: number, name: string): string {
    const el = this.values.get(tag);
    const comment = (what: string) => `${name} ${tagName(tag)} ${what}`;
    if (el === undefined) throw new DatasetRefusal(RefusalStatus.DataSetMismatch, comment("missing"), `the data set has no ${name} ${tagName(tag)}: Orthanc refuses it`, tag);
    const raw = el.value;
    // UN: Orthanc takes the bytes as they are (one trailing NUL removed), without DCMTK's white space removal.
    const v = el.vr === VR.UN ? latin1OrUndefined(unValue(raw)) : dcmtkUid(raw);
    if (v === "") throw new DatasetRefusal(RefusalStatus.DataSetMismatch, comment("is empty"), `${name} ${tagName(tag)} is empty: Orthanc refuses it`, tag);
    if (v === undefined || !isValidUid(v)) {
      throw new DatasetRefusal(RefusalStatus.DataSetMismatch, comment("is not a valid UID"), `${name} ${tagName(tag)} is "${printable(raw)}", not a valid UID (PS3.5 9.1: digits and dots, at most 64 characters)`, tag);
    }
    return v;
  }
}

/**
 * An explicit VR UN value of a public text element as Orthanc reads it: the bytes, less one trailing NUL
 * when the length is even (an odd length reads the same whether or not DCMTK pads it with a NUL first).
 */
function unValue(raw: Uint8Array): Uint8Array {
  return raw.length % 2 === 0 && raw.length > 0 && raw[raw.length - 1] === 0 ? raw.subarray(0, raw.length - 1) : raw;
}

function latin1OrUndefined(b: Uint8Array): string | undefined {
  return b.includes(0) ? undefined : latin1(b);
}

/** PatientID as Orthanc hashes it, or the refusal of a value whose reading by Orthanc cannot be predicted. */
export function patientIdAsOrthanc(raw: Uint8Array, detected: DetectedEncoding, charset?: Uint8Array, un = false): string {
  const r = convertToUtf8(un ? unValue(raw) : dcmtkValue(raw, 0x20), detected.encoding, detected.hasCodeExtensions);
  const set = detected.term ?? encodingLabel(detected.encoding);
  if (!r.ok) {
    throw new DatasetRefusal(
      RefusalStatus.DataSetMismatch,
      `PatientID is not valid ${set} text`.slice(0, 64),
      `PatientID (0010,0020) "${printable(raw)}" in ${charset ? `Specific Character Set "${printable(charset)}"` : `DefaultEncoding ${detected.encoding}`}: ${r.reason}; where Orthanc would file it cannot be predicted — fix the modality's character set`,
      Tag.PatientID,
    );
  }
  const bytes = new TextEncoder().encode(r.text).length;
  if (bytes > ORTHANC_MAX_STRING_BYTES) {
    throw new DatasetRefusal(
      RefusalStatus.DataSetMismatch,
      `PatientID longer than Orthanc's ${ORTHANC_MAX_STRING_BYTES}-byte limit`,
      `PatientID (0010,0020) is ${bytes} bytes in UTF-8; Orthanc keeps no value above ${ORTHANC_MAX_STRING_BYTES} (LO allows 64 characters)`,
      Tag.PatientID,
    );
  }
  return r.text;
}

function latin1(b: Uint8Array): string {
  let s = "";
  for (let i = 0; i < b.length; i++) s += String.fromCharCode(b[i]!);
  return s;
}

/** A value for a log line: printable ASCII as is, other bytes as \xNN, at most 80 bytes. */
function printable(b: Uint8Array): string {
  let s = "";
  for (let i = 0; i < Math.min(b.length, 80); i++) {
    const c = b[i]!;
    s += c >= 0x20 && c < 0x7f && c !== 0x5c ? String.fromCharCode(c) : `\\x${c.toString(16).padStart(2, "0")}`;
  }
  return b.length > 80 ? `${s}...` : s;
}

/** Streaming inflate (PS3.5 A.5: raw deflate, no zlib header) feeding the scanner, with the cost bound. */
class Inflater {
  private readonly z: InflateRaw;
  private error: unknown;
  private compressed = 0;
  private inflated = 0;
  private readonly done: Promise<void>;

  constructor(
    sink: (b: Uint8Array) => void,
    private readonly limit: { floorBytes: number; ratio: number },
  ) {
    this.z = zlib().createInflateRaw();
    this.z.on("data", (b: Uint8Array) => {
      if (this.error) return;
      try {
        this.inflated += b.length;
        if (this.inflated > this.limit.floorBytes + this.limit.ratio * this.compressed) {
          throw new DatasetRefusal(
            RefusalStatus.CannotUnderstand,
            "Deflated data set inflates beyond the gateway's bound",
            `the deflated data set inflates to more than ${this.limit.floorBytes} bytes + ${this.limit.ratio} x its ${this.compressed} deflated bytes: refused as a decompression bomb`,
          );
        }
        sink(b);
      } catch (e) {
        this.error = e;
        this.z.destroy();
      }
    });
    // 'close' comes last, after 'end' or an error (and after destroy()).
    let closed!: () => void;
    this.done = new Promise<void>((resolve) => (closed = resolve));
    this.z.once("close", () => closed());
    this.z.once("error", (e: Error & { code?: string }) => {
      this.error ??=
        e.code === "Z_BUF_ERROR"
          ? new DatasetRefusal(RefusalStatus.CannotUnderstand, "Deflated data set truncated", "the deflate stream of the data set ends before its final block: the modality sent an incomplete data set")
          : new DatasetRefusal(RefusalStatus.CannotUnderstand, "Deflated data set cannot be inflated", `the deflated data set is not a valid deflate stream (PS3.5 A.5): ${e.message}`);
      closed();
    });
  }

  write(chunk: Uint8Array): Promise<void> {
    if (this.error) return Promise.reject(this.error);
    this.compressed += chunk.length;
    return new Promise<void>((resolve, reject) => {
      const settle = () => (this.error ? reject(this.error) : resolve());
      this.z.write(chunk, settle);
      // After an error the write callback may never come (Bun): the stream's closing settles it.
      void this.done.then(settle);
    });
  }

  async finish(): Promise<void> {
    if (!this.error) this.z.end();
    await this.done;
    if (this.error) throw this.error;
  }
}

/** Reads a whole data set (bytes, or chunks as they arrive) and gives its identity, or throws DatasetRefusal. */
export async function readInstanceIdentity(dataset: Uint8Array | AsyncIterable<Uint8Array>, transferSyntaxUid: string, opts: InstanceReaderOptions): Promise<InstanceIdentity> {
  const reader = new InstanceReader(transferSyntaxUid, opts);
  if (dataset instanceof Uint8Array) await reader.push(dataset);
  else for await (const chunk of dataset) await reader.push(chunk);
  return reader.end();
}
