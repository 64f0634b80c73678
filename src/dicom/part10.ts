/**
 * Part 10 file meta information (PS3.10 7.1): preamble, "DICM", group 0002 in explicit VR little endian.
 * The one reader and writer of it: the gateway writes it in front of the data set bytes exactly as
 * received (the file a modality's C-STORE becomes is its data set, unchanged, with a meta header built
 * from the command), reads it back from the spool, and reads it from the start of the files Orthanc
 * streams for C-MOVE/C-GET, before the data set has arrived. Elements go through the element codec.
 */
import { EXPLICIT_LITTLE, ElementWriter, readElementHeader, UNDEFINED_LENGTH, type ElementHeader } from "./element-codec.ts";
import { IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME } from "./implementation.ts";
import { getU32LE } from "../shared/bytes.ts";

export { explicitVrElement } from "./element-codec.ts";

export interface FileMeta {
  /** (0002,0002) Media Storage SOP Class UID. */
  sopClassUid: string;
  /** (0002,0003) Media Storage SOP Instance UID. */
  sopInstanceUid: string;
  /** (0002,0010) Transfer Syntax UID. */
  transferSyntaxUid: string;
  /** (0002,0016) Source Application Entity Title: the calling AE of the C-STORE. */
  sourceAeTitle?: string;
}

const PREAMBLE = 128;
const GROUP_START = PREAMBLE + 4;

function text(s: string, pad: string): Uint8Array {
  const v = s.length % 2 ? s + pad : s;
  const b = new Uint8Array(v.length);
  for (let i = 0; i < v.length; i++) b[i] = v.charCodeAt(i) & 0x7f;
  return b;
}

export function encodeFileMeta(meta: FileMeta): Uint8Array {
  const group = new ElementWriter(EXPLICIT_LITTLE, 256);
  group.element(0x00020001, "OB", Uint8Array.of(0, 1));
  group.element(0x00020002, "UI", text(meta.sopClassUid, "\0"));
  group.element(0x00020003, "UI", text(meta.sopInstanceUid, "\0"));
  group.element(0x00020010, "UI", text(meta.transferSyntaxUid, "\0"));
  group.element(0x00020012, "UI", text(IMPLEMENTATION_CLASS_UID, "\0"));
  group.element(0x00020013, "SH", text(IMPLEMENTATION_VERSION_NAME, " "));
  if (meta.sourceAeTitle) group.element(0x00020016, "AE", text(meta.sourceAeTitle.slice(0, 16), " "));
  const elements = group.bytes();
  const out = new ElementWriter(EXPLICIT_LITTLE, GROUP_START + 12 + elements.length);
  out.put(new Uint8Array(PREAMBLE));
  out.put(Uint8Array.of(0x44, 0x49, 0x43, 0x4d)); // "DICM"
  const groupLength = new Uint8Array(4);
  new DataView(groupLength.buffer).setUint32(0, elements.length, true);
  out.element(0x00020000, "UL", groupLength);
  out.put(elements);
  return out.bytes();
}

function checkPrefix(head: Uint8Array): void {
  if (head[128] !== 0x44 || head[129] !== 0x49 || head[130] !== 0x43 || head[131] !== 0x4d) throw new Error("not a DICOM Part 10 file (no DICM prefix)");
}

/**
 * Length of the preamble + meta information of a Part 10 file, from its first bytes
 * (group length (0002,0000) is mandatory, PS3.10 7.1). Returns undefined if `head` is too short.
 */
export function fileMetaLength(head: Uint8Array): number | undefined {
  if (head.length < 144) return undefined;
  checkPrefix(head);
  const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
  if (dv.getUint16(132, true) !== 2 || dv.getUint16(134, true) !== 0) throw new Error("Part 10 file without (0002,0000) group length");
  return 144 + dv.getUint32(140, true);
}

const latin1 = new TextDecoder("latin1");

/**
 * Reads the meta information from the first bytes of a Part 10 file: its values ("" for an absent UID)
 * and the offset of the data set, or undefined while `head` ends before the meta information does. The
 * group ends where (0002,0000) says, or, without it, at the first element of another group.
 * Throws for what is no Part 10 file, and for meta information without a Transfer Syntax UID.
 */
export function readFileMeta(head: Uint8Array): { meta: FileMeta; datasetOffset: number } | undefined {
  if (head.length < GROUP_START) return undefined;
  checkPrefix(head);
  const values = new Map<number, string>();
  const h: ElementHeader = { tag: 0, vr: 0, length: 0 };
  let end = -1; // from the group length, once read
  let o = GROUP_START;
  while (o !== end) {
    if (o + 2 > head.length) return undefined;
    if ((head[o]! | (head[o + 1]! << 8)) !== 0x0002) break;
    const n = readElementHeader(head, o, head.length - o, true, true, h);
    if (n === 0) return undefined;
    if (h.length === UNDEFINED_LENGTH) throw new Error("undefined length in the file meta information");
    const start = o + n;
    if (start + h.length > head.length) return undefined;
    const value = head.subarray(start, start + h.length);
    if (h.tag === 0x00020000 && h.length === 4) end = start + 4 + getU32LE(value, 0);
    else if (h.tag === 0x00020002 || h.tag === 0x00020003 || h.tag === 0x00020010 || h.tag === 0x00020016) values.set(h.tag, latin1.decode(value).replace(/[\0 ]+$/, ""));
    o = start + h.length;
  }
  const transferSyntaxUid = values.get(0x00020010);
  if (!transferSyntaxUid) throw new Error("file meta information without Transfer Syntax UID (0002,0010)");
  const sourceAeTitle = values.get(0x00020016);
  return {
    meta: { sopClassUid: values.get(0x00020002) ?? "", sopInstanceUid: values.get(0x00020003) ?? "", transferSyntaxUid, ...(sourceAeTitle ? { sourceAeTitle } : {}) },
    datasetOffset: o,
  };
}

/** Reads the complete meta information of a Part 10 file (its first fileMetaLength() bytes or more); every UID required. */
export function decodeFileMeta(head: Uint8Array): FileMeta {
  const end = fileMetaLength(head);
  if (end === undefined || end > head.length) throw new Error("Part 10 meta information is truncated");
  const read = readFileMeta(head.subarray(0, end));
  if (!read) throw new Error("Part 10 meta information is truncated");
  const need = (v: string, name: string) => {
    if (!v) throw new Error(`Part 10 meta information without ${name}`);
    return v;
  };
  return {
    sopClassUid: need(read.meta.sopClassUid, "MediaStorageSOPClassUID"),
    sopInstanceUid: need(read.meta.sopInstanceUid, "MediaStorageSOPInstanceUID"),
    transferSyntaxUid: read.meta.transferSyntaxUid,
    sourceAeTitle: read.meta.sourceAeTitle,
  };
}
