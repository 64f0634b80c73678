/**
 * Reads a few top-level attributes (PatientID, Study/Series/SOP Instance UID) from the first bytes of a
 * data set, without decoding the rest: enough to know where Orthanc will file an instance before it is
 * stored. Handles implicit VR little endian, explicit VR little and big endian (PS3.5 7.1), deflate
 * (inflating only the head) and undefined-length sequences and items (PS3.5 7.5) that come before them.
 */
import { inflateRawSync, constants as zlib } from "node:zlib";
import { TransferSyntax } from "../dimse/constants.ts";

export const Tag = {
  SOPInstanceUID: 0x00080018,
  PatientID: 0x00100020,
  StudyInstanceUID: 0x0020000d,
  SeriesInstanceUID: 0x0020000e,
} as const;

/** The most a deflated head may inflate to (the UIDs sit in the first kilobytes of any real data set). */
const MAX_INFLATED = 4 << 20;

const WANTED = [Tag.SOPInstanceUID, Tag.PatientID, Tag.StudyInstanceUID, Tag.SeriesInstanceUID];
const LAST_WANTED = Math.max(...WANTED);
const LONG_VRS = new Set(["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"]);
/** VR strings by their two bytes, so the hot loop does not build strings. */
const VR_NAMES: Record<number, string> = Object.fromEntries(
  ["AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV"].map((v) => [(v.charCodeAt(0) << 8) | v.charCodeAt(1), v]),
);
const ITEM = 0xfffee000;
const ITEM_END = 0xfffee00d;
const SEQ_END = 0xfffee0dd;

export interface DatasetHead {
  patientId: string;
  studyInstanceUid: string;
  seriesInstanceUid: string;
  sopInstanceUid: string;
}

export class DatasetHeadError extends Error {
  override name = "DatasetHeadError";
  constructor(
    message: string,
    /** The bytes given ended before the attributes: a longer head may succeed. */
    readonly truncated = false,
  ) {
    super(message);
  }
}

class Truncated extends Error {}

class Reader {
  o = 0;
  private readonly dv: DataView;
  constructor(
    readonly b: Uint8Array,
    readonly little: boolean,
    public explicit: boolean,
  ) {
    this.dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  }
  need(n: number): void {
    if (this.o + n > this.b.length) throw new Truncated();
  }
  u16(): number {
    this.need(2);
    const v = this.dv.getUint16(this.o, this.little);
    this.o += 2;
    return v;
  }
  u32(): number {
    this.need(4);
    const v = this.dv.getUint32(this.o, this.little);
    this.o += 4;
    return v;
  }
  tag(): number {
    const g = this.u16();
    return ((g << 16) | this.u16()) >>> 0;
  }
  /** Element header after the tag: [vr, length]; length 0xFFFFFFFF = undefined. */
  header(tag: number): [string, number] {
    if ((tag >>> 16) === 0xfffe) return ["", this.u32()]; // item and delimiters: no VR in any syntax
    if (!this.explicit) return ["", this.u32()];
    this.need(2);
    const vr = VR_NAMES[(this.b[this.o]! << 8) | this.b[this.o + 1]!] ?? String.fromCharCode(this.b[this.o]!, this.b[this.o + 1]!);
    this.o += 2;
    if (LONG_VRS.has(vr)) {
      this.o += 2;
      return [vr, this.u32()];
    }
    return [vr, this.u16()];
  }
  skip(n: number): void {
    this.need(n);
    this.o += n;
  }
}

/** Skips the content of an undefined-length sequence (items until the sequence delimiter). */
function skipUndefinedSequence(r: Reader, implicitInside: boolean): void {
  for (;;) {
    const tag = r.tag();
    const len = r.u32();
    if (tag === SEQ_END) return;
    if (tag !== ITEM) throw new DatasetHeadError(`unexpected (${hex(tag)}) in a sequence`);
    if (len !== 0xffffffff) {
      r.skip(len);
      continue;
    }
    // An undefined-length item: nested elements until the item delimiter.
    const saved = r.explicit;
    if (implicitInside) r.explicit = false;
    for (;;) {
      const t = r.tag();
      if (t === ITEM_END) {
        r.u32();
        break;
      }
      skipElement(r, t);
    }
    r.explicit = saved;
  }
}

function skipElement(r: Reader, tag: number): void {
  const [vr, len] = r.header(tag);
  if (len === 0xffffffff) {
    // SQ, or UN/OB with undefined length (encapsulated data): a sequence of items. UN contents are implicit VR LE (PS3.5 6.2.2).
    skipUndefinedSequence(r, vr === "UN");
    return;
  }
  r.skip(len);
}

function hex(tag: number): string {
  return `${(tag >>> 16).toString(16).padStart(4, "0")},${(tag & 0xffff).toString(16).padStart(4, "0")}`.toUpperCase();
}

/**
 * The attributes from the head of a data set in `transferSyntax`. Throws DatasetHeadError when the head
 * ends before them, a required one is missing or the encoding is broken.
 */
export function readDatasetHead(head: Uint8Array, transferSyntax: string): DatasetHead {
  let bytes = head;
  if (transferSyntax === TransferSyntax.DeflatedExplicitVRLittleEndian) {
    try {
      // Bounded: a deflate bomb must not cost more than MAX_INFLATED of memory and time.
      bytes = inflateRawSync(head, { finishFlush: zlib.Z_SYNC_FLUSH, maxOutputLength: MAX_INFLATED });
    } catch (e) {
      const tooLarge = (e as { code?: string }).code === "ERR_BUFFER_TOO_LARGE";
      throw new DatasetHeadError(tooLarge ? `the deflated data set inflates beyond ${MAX_INFLATED >> 20} MiB before its UIDs` : `cannot inflate the deflated data set: ${(e as Error).message}`);
    }
  }
  const r = new Reader(bytes, transferSyntax !== TransferSyntax.ExplicitVRBigEndian, transferSyntax !== TransferSyntax.ImplicitVRLittleEndian);
  const found = new Map<number, string>();
  try {
    while (r.o < bytes.length) {
      const tag = r.tag();
      if (tag > LAST_WANTED) break;
      if (WANTED.includes(tag as (typeof WANTED)[number])) {
        const [, len] = r.header(tag);
        if (len === 0xffffffff) throw new DatasetHeadError(`(${hex(tag)}) has an undefined length`);
        r.need(len);
        found.set(tag, new TextDecoder("latin1").decode(bytes.subarray(r.o, r.o + len)).replace(/[\0 ]+$/, "").replace(/^ +/, ""));
        r.o += len;
        continue;
      }
      skipElement(r, tag);
    }
  } catch (e) {
    if (!(e instanceof Truncated)) throw e instanceof DatasetHeadError ? e : new DatasetHeadError((e as Error).message);
    if (found.size < WANTED.length) throw new DatasetHeadError("the data set ends (or its head is too long) before PatientID, Study, Series and SOP Instance UID", true);
  }
  const need = (tag: number, name: string) => {
    const v = found.get(tag);
    if (v === undefined || (v === "" && tag !== Tag.PatientID)) throw new DatasetHeadError(`the data set has no ${name} (${hex(tag)})`);
    return v;
  };
  return {
    patientId: found.get(Tag.PatientID) ?? "",
    studyInstanceUid: need(Tag.StudyInstanceUID, "Study Instance UID"),
    seriesInstanceUid: need(Tag.SeriesInstanceUID, "Series Instance UID"),
    sopInstanceUid: need(Tag.SOPInstanceUID, "SOP Instance UID"),
  };
}
