/**
 * Part 10 file meta information (PS3.10 7.1): preamble, "DICM", group 0002 in explicit VR little
 * endian. The gateway writes it in front of the data set bytes exactly as received, so the file a
 * modality's C-STORE becomes is its data set, unchanged, with a meta header built from the command.
 */
import { IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME } from "./implementation.ts";

export interface FileMeta {
  sopClassUid: string;
  sopInstanceUid: string;
  transferSyntaxUid: string;
  /** (0002,0016) Source Application Entity Title: the calling AE of the C-STORE. */
  sourceAeTitle?: string;
}

/** One explicit VR little endian element (PS3.5 7.1.2) with `value` as given (already even-length). */
export function explicitVrElement(group: number, el: number, vr: string, value: Uint8Array): Uint8Array {
  const long = vr === "OB" || vr === "OW" || vr === "UN" || vr === "SQ" || vr === "UT";
  const header = new Uint8Array(long ? 12 : 8);
  const dv = new DataView(header.buffer);
  dv.setUint16(0, group, true);
  dv.setUint16(2, el, true);
  header[4] = vr.charCodeAt(0);
  header[5] = vr.charCodeAt(1);
  if (long) dv.setUint32(8, value.length, true);
  else dv.setUint16(6, value.length, true);
  const out = new Uint8Array(header.length + value.length);
  out.set(header);
  out.set(value, header.length);
  return out;
}

function text(s: string, pad: string): Uint8Array {
  const v = s.length % 2 ? s + pad : s;
  const b = new Uint8Array(v.length);
  for (let i = 0; i < v.length; i++) b[i] = v.charCodeAt(i) & 0x7f;
  return b;
}

export function encodeFileMeta(meta: FileMeta): Uint8Array {
  const elements = [
    explicitVrElement(2, 0x0001, "OB", Uint8Array.of(0, 1)),
    explicitVrElement(2, 0x0002, "UI", text(meta.sopClassUid, "\0")),
    explicitVrElement(2, 0x0003, "UI", text(meta.sopInstanceUid, "\0")),
    explicitVrElement(2, 0x0010, "UI", text(meta.transferSyntaxUid, "\0")),
    explicitVrElement(2, 0x0012, "UI", text(IMPLEMENTATION_CLASS_UID, "\0")),
    explicitVrElement(2, 0x0013, "SH", text(IMPLEMENTATION_VERSION_NAME, " ")),
    ...(meta.sourceAeTitle ? [explicitVrElement(2, 0x0016, "AE", text(meta.sourceAeTitle.slice(0, 16), " "))] : []),
  ];
  const groupLength = elements.reduce((n, e) => n + e.length, 0);
  const gl = new Uint8Array(4);
  new DataView(gl.buffer).setUint32(0, groupLength, true);
  const all = [explicitVrElement(2, 0x0000, "UL", gl), ...elements];
  const out = new Uint8Array(132 + all.reduce((n, e) => n + e.length, 0));
  out.set([0x44, 0x49, 0x43, 0x4d], 128); // "DICM"
  let o = 132;
  for (const e of all) {
    out.set(e, o);
    o += e.length;
  }
  return out;
}

/**
 * Length of the preamble + meta information of a Part 10 file, from its first bytes
 * (group length (0002,0000) is mandatory, PS3.10 7.1). Returns undefined if `head` is too short.
 */
export function fileMetaLength(head: Uint8Array): number | undefined {
  if (head.length < 144) return undefined;
  if (head[128] !== 0x44 || head[129] !== 0x49 || head[130] !== 0x43 || head[131] !== 0x4d) throw new Error("not a DICOM Part 10 file (no DICM prefix)");
  const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
  if (dv.getUint16(132, true) !== 2 || dv.getUint16(134, true) !== 0) throw new Error("Part 10 file without (0002,0000) group length");
  return 144 + dv.getUint32(140, true);
}

/** Reads the file meta information written by encodeFileMeta (or any Part 10 file): group 0002, explicit VR LE. */
export function decodeFileMeta(head: Uint8Array): FileMeta {
  const end = fileMetaLength(head);
  if (end === undefined || end > head.length) throw new Error("Part 10 meta information is truncated");
  const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
  const text = (o: number, n: number) => new TextDecoder("latin1").decode(head.subarray(o, o + n)).replace(/[\0 ]+$/, "");
  const values = new Map<number, string>();
  let o = 132;
  while (o + 8 <= end) {
    const el = dv.getUint16(o + 2, true);
    const vr = String.fromCharCode(head[o + 4]!, head[o + 5]!);
    const long = vr === "OB" || vr === "OW" || vr === "UN" || vr === "SQ" || vr === "UT";
    const len = long ? dv.getUint32(o + 8, true) : dv.getUint16(o + 6, true);
    const start = o + (long ? 12 : 8);
    if (vr === "UI" || vr === "AE" || vr === "SH") values.set(el, text(start, len));
    o = start + len;
  }
  const need = (el: number, name: string) => {
    const v = values.get(el);
    if (!v) throw new Error(`Part 10 meta information without ${name}`);
    return v;
  };
  return {
    sopClassUid: need(0x0002, "MediaStorageSOPClassUID"),
    sopInstanceUid: need(0x0003, "MediaStorageSOPInstanceUID"),
    transferSyntaxUid: need(0x0010, "TransferSyntaxUID"),
    sourceAeTitle: values.get(0x0016),
  };
}
