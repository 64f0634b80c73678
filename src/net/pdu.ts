/**
 * Encoding and decoding of the PS3.8 section 9.3 PDUs. Multi-byte integers are big endian (PS3.8 9.3.1).
 * Decoders throw PduError with the A-ABORT reason the standard prescribes for the defect.
 */
import { concatBytes } from "../shared/bytes.ts";
import { AbortReason, ItemType, PduType } from "./constants.ts";

export class PduError extends Error {
  constructor(
    message: string,
    /** A-ABORT reason (service-provider source), PS3.8 table 9-26. */
    readonly abortReason: number = AbortReason.InvalidPduParameterValue,
  ) {
    super(message);
    this.name = "PduError";
  }
}

export interface PresentationContextProposal {
  id: number;
  abstractSyntax: string;
  transferSyntaxes: string[];
}

export interface PresentationContextAnswer {
  id: number;
  /** PresentationContextResult */
  result: number;
  /** The accepted transfer syntax; for rejections any offered one (the value is not significant, PS3.8 9.3.3.2). */
  transferSyntax: string;
}

/** SCP/SCU Role Selection sub-item, PS3.7 D.3.3.4. */
export interface RoleSelection {
  sopClassUid: string;
  scu: boolean;
  scp: boolean;
}

export interface UserInformation {
  /** Maximum Length Receive (0 = no limit), PS3.8 D.1. */
  maxPduLength: number;
  implementationClassUid: string;
  implementationVersionName?: string;
  asyncOps?: { invoked: number; performed: number };
  roleSelections: RoleSelection[];
  /** Sub-items we do not interpret, kept verbatim (extended negotiation, user identity...). */
  otherItems: { type: number; data: Uint8Array }[];
}

export interface AssociateRQ {
  protocolVersion: number;
  calledAeTitle: string;
  callingAeTitle: string;
  applicationContext: string;
  presentationContexts: PresentationContextProposal[];
  userInformation: UserInformation;
}

export interface AssociateAC {
  protocolVersion: number;
  calledAeTitle: string;
  callingAeTitle: string;
  applicationContext: string;
  presentationContexts: PresentationContextAnswer[];
  userInformation: UserInformation;
}

export interface AssociateRJ {
  result: number;
  source: number;
  reason: number;
}

export interface Abort {
  source: number;
  reason: number;
}

const latin1 = new TextDecoder("latin1");

/** AE titles travel as 16 bytes padded with spaces; leading and trailing spaces are not significant (PS3.5 6.2). */
export function decodeAeTitle(bytes: Uint8Array): string {
  return latin1.decode(bytes).replace(/\0+$/, "").trim();
}

function writeAeTitle(out: Uint8Array, offset: number, ae: string): void {
  for (let i = 0; i < 16; i++) out[offset + i] = i < ae.length ? ae.charCodeAt(i) & 0x7f : 0x20;
}

/** UIDs in items are not padded; tolerate a trailing NUL or space some implementations add. */
function decodeUid(bytes: Uint8Array): string {
  return latin1.decode(bytes).replace(/[\0 ]+$/, "");
}

function asciiBytes(s: string): Uint8Array {
  const b = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) b[i] = s.charCodeAt(i) & 0x7f;
  return b;
}

/** Builds a byte sequence from parts; used by all encoders. */
class Writer {
  private parts: Uint8Array[] = [];
  bytes(b: Uint8Array): this {
    this.parts.push(b);
    return this;
  }
  u8(v: number): this {
    return this.bytes(Uint8Array.of(v & 0xff));
  }
  u16(v: number): this {
    return this.bytes(Uint8Array.of((v >> 8) & 0xff, v & 0xff));
  }
  u32(v: number): this {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, v >>> 0);
    return this.bytes(b);
  }
  /** An item: type, reserved, 16-bit length, content. */
  item(type: number, content: Uint8Array): this {
    if (content.length > 0xffff) throw new RangeError(`item 0x${type.toString(16)} too long (${content.length} bytes)`);
    return this.u8(type).u8(0).u16(content.length).bytes(content);
  }
  concat(): Uint8Array {
    return concatBytes(this.parts);
  }
}

function pdu(type: number, body: Uint8Array): Uint8Array {
  const out = new Uint8Array(6 + body.length);
  const dv = new DataView(out.buffer);
  out[0] = type;
  dv.setUint32(2, body.length);
  out.set(body, 6);
  return out;
}

function encodeUserInformation(ui: UserInformation): Uint8Array {
  const w = new Writer();
  const max = new Uint8Array(4);
  new DataView(max.buffer).setUint32(0, ui.maxPduLength >>> 0);
  w.item(ItemType.MaximumLength, max);
  w.item(ItemType.ImplementationClassUid, asciiBytes(ui.implementationClassUid));
  if (ui.asyncOps) {
    w.item(ItemType.AsynchronousOperationsWindow, new Writer().u16(ui.asyncOps.invoked).u16(ui.asyncOps.performed).concat());
  }
  for (const r of ui.roleSelections) {
    const uid = asciiBytes(r.sopClassUid);
    w.item(ItemType.RoleSelection, new Writer().u16(uid.length).bytes(uid).u8(r.scu ? 1 : 0).u8(r.scp ? 1 : 0).concat());
  }
  if (ui.implementationVersionName) w.item(ItemType.ImplementationVersionName, asciiBytes(ui.implementationVersionName));
  for (const o of ui.otherItems) w.item(o.type, o.data);
  return new Writer().item(ItemType.UserInformation, w.concat()).concat();
}

function associateHeader(type: number, called: string, calling: string, protocolVersion: number, items: Uint8Array): Uint8Array {
  const fixed = new Uint8Array(68);
  new DataView(fixed.buffer).setUint16(0, protocolVersion);
  writeAeTitle(fixed, 4, called);
  writeAeTitle(fixed, 20, calling);
  return pdu(type, new Writer().bytes(fixed).bytes(items).concat());
}

export function encodeAssociateRQ(rq: AssociateRQ): Uint8Array {
  const w = new Writer().item(ItemType.ApplicationContext, asciiBytes(rq.applicationContext));
  for (const pc of rq.presentationContexts) {
    const sub = new Writer().u8(pc.id).u8(0).u8(0).u8(0).item(ItemType.AbstractSyntax, asciiBytes(pc.abstractSyntax));
    for (const ts of pc.transferSyntaxes) sub.item(ItemType.TransferSyntax, asciiBytes(ts));
    w.item(ItemType.PresentationContextRQ, sub.concat());
  }
  w.bytes(encodeUserInformation(rq.userInformation));
  return associateHeader(PduType.AssociateRQ, rq.calledAeTitle, rq.callingAeTitle, rq.protocolVersion, w.concat());
}

export function encodeAssociateAC(ac: AssociateAC): Uint8Array {
  const w = new Writer().item(ItemType.ApplicationContext, asciiBytes(ac.applicationContext));
  for (const pc of ac.presentationContexts) {
    const sub = new Writer().u8(pc.id).u8(0).u8(pc.result).u8(0).item(ItemType.TransferSyntax, asciiBytes(pc.transferSyntax));
    w.item(ItemType.PresentationContextAC, sub.concat());
  }
  w.bytes(encodeUserInformation(ac.userInformation));
  return associateHeader(PduType.AssociateAC, ac.calledAeTitle, ac.callingAeTitle, ac.protocolVersion, w.concat());
}

export function encodeAssociateRJ(rj: AssociateRJ): Uint8Array {
  return pdu(PduType.AssociateRJ, Uint8Array.of(0, rj.result, rj.source, rj.reason));
}

export function encodeReleaseRQ(): Uint8Array {
  return pdu(PduType.ReleaseRQ, new Uint8Array(4));
}

export function encodeReleaseRP(): Uint8Array {
  return pdu(PduType.ReleaseRP, new Uint8Array(4));
}

export function encodeAbort(a: Abort): Uint8Array {
  return pdu(PduType.Abort, Uint8Array.of(0, 0, a.source, a.reason));
}

/** One PDV: presentation context, whether it carries command or data set bytes, and whether it is the last fragment. */
export interface Pdv {
  presentationContextId: number;
  isCommand: boolean;
  isLast: boolean;
  data: Uint8Array;
}

function putU32BE(b: Uint8Array, o: number, v: number): void {
  b[o] = (v >>> 24) & 0xff;
  b[o + 1] = (v >>> 16) & 0xff;
  b[o + 2] = (v >>> 8) & 0xff;
  b[o + 3] = v & 0xff;
}

/** The header of a P-DATA-TF PDU carrying a single PDV of `dataLength` bytes (PS3.8 9.3.5, E.2). */
export function encodePDataHeader(pcId: number, isCommand: boolean, isLast: boolean, dataLength: number): Uint8Array {
  const h = new Uint8Array(12);
  h[0] = PduType.PData;
  putU32BE(h, 2, dataLength + 6);
  putU32BE(h, 6, dataLength + 2);
  h[10] = pcId;
  h[11] = (isCommand ? 1 : 0) | (isLast ? 2 : 0);
  return h;
}

/** Splits the body of a P-DATA-TF PDU into PDVs (views into `body`, no copy). */
export function decodePData(body: Uint8Array): Pdv[] {
  const dv = new DataView(body.buffer, body.byteOffset, body.byteLength);
  const pdvs: Pdv[] = [];
  let o = 0;
  if (body.length === 0) throw new PduError("P-DATA-TF without any PDV item");
  while (o < body.length) {
    if (o + 6 > body.length) throw new PduError("truncated PDV item header in P-DATA-TF");
    const len = dv.getUint32(o);
    if (len < 2 || o + 4 + len > body.length) throw new PduError(`PDV item length ${len} does not fit the P-DATA-TF PDU`);
    const pcId = body[o + 4]!;
    const mch = body[o + 5]!;
    if (pcId % 2 === 0) throw new PduError(`PDV presentation context ID ${pcId} is not odd`);
    pdvs.push({ presentationContextId: pcId, isCommand: (mch & 1) === 1, isLast: (mch & 2) === 2, data: body.subarray(o + 6, o + 4 + len) });
    o += 4 + len;
  }
  return pdvs;
}

interface RawItem {
  type: number;
  data: Uint8Array;
}

function readItems(buf: Uint8Array, start: number, end: number, what: string): RawItem[] {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const items: RawItem[] = [];
  let o = start;
  while (o < end) {
    if (o + 4 > end) throw new PduError(`truncated item header in ${what}`);
    const type = buf[o]!;
    const len = dv.getUint16(o + 2);
    if (o + 4 + len > end) throw new PduError(`item 0x${type.toString(16)} of ${len} bytes overruns ${what}`);
    items.push({ type, data: buf.subarray(o + 4, o + 4 + len) });
    o += 4 + len;
  }
  return items;
}

function decodeUserInformation(data: Uint8Array): UserInformation {
  const ui: UserInformation = { maxPduLength: 0, implementationClassUid: "", roleSelections: [], otherItems: [] };
  for (const it of readItems(data, 0, data.length, "user information item")) {
    const dv = new DataView(it.data.buffer, it.data.byteOffset, it.data.byteLength);
    switch (it.type) {
      case ItemType.MaximumLength:
        if (it.data.length !== 4) throw new PduError("maximum length sub-item must be 4 bytes");
        ui.maxPduLength = dv.getUint32(0);
        break;
      case ItemType.ImplementationClassUid:
        ui.implementationClassUid = decodeUid(it.data);
        break;
      case ItemType.ImplementationVersionName:
        ui.implementationVersionName = latin1.decode(it.data).trim();
        break;
      case ItemType.AsynchronousOperationsWindow:
        if (it.data.length !== 4) throw new PduError("asynchronous operations window sub-item must be 4 bytes");
        ui.asyncOps = { invoked: dv.getUint16(0), performed: dv.getUint16(2) };
        break;
      case ItemType.RoleSelection: {
        if (it.data.length < 4) throw new PduError("truncated SCP/SCU role selection sub-item");
        const n = dv.getUint16(0);
        if (2 + n + 2 !== it.data.length) throw new PduError("SCP/SCU role selection sub-item length mismatch");
        ui.roleSelections.push({ sopClassUid: decodeUid(it.data.subarray(2, 2 + n)), scu: it.data[2 + n] === 1, scp: it.data[3 + n] === 1 });
        break;
      }
      default:
        ui.otherItems.push({ type: it.type, data: it.data.slice() });
    }
  }
  return ui;
}

function decodeAssociateCommon(body: Uint8Array, what: string) {
  if (body.length < 68) throw new PduError(`${what} shorter than its fixed fields`);
  const dv = new DataView(body.buffer, body.byteOffset, body.byteLength);
  return {
    protocolVersion: dv.getUint16(0),
    calledAeTitle: decodeAeTitle(body.subarray(4, 20)),
    callingAeTitle: decodeAeTitle(body.subarray(20, 36)),
    items: readItems(body, 68, body.length, what),
  };
}

export function decodeAssociateRQ(body: Uint8Array): AssociateRQ {
  const c = decodeAssociateCommon(body, "A-ASSOCIATE-RQ");
  let applicationContext: string | undefined;
  let userInformation: UserInformation | undefined;
  const presentationContexts: PresentationContextProposal[] = [];
  for (const it of c.items) {
    if (it.type === ItemType.ApplicationContext) applicationContext = decodeUid(it.data);
    else if (it.type === ItemType.UserInformation) userInformation = decodeUserInformation(it.data);
    else if (it.type === ItemType.PresentationContextRQ) {
      if (it.data.length < 4) throw new PduError("truncated presentation context item");
      const id = it.data[0]!;
      let abstractSyntax: string | undefined;
      const transferSyntaxes: string[] = [];
      for (const sub of readItems(it.data, 4, it.data.length, "presentation context item")) {
        if (sub.type === ItemType.AbstractSyntax) abstractSyntax = decodeUid(sub.data);
        else if (sub.type === ItemType.TransferSyntax) transferSyntaxes.push(decodeUid(sub.data));
        else throw new PduError(`unexpected sub-item 0x${sub.type.toString(16)} in presentation context ${id}`, AbortReason.UnexpectedPduParameter);
      }
      if (id % 2 === 0) throw new PduError(`presentation context ID ${id} is not odd`);
      if (!abstractSyntax) throw new PduError(`presentation context ${id} has no abstract syntax`);
      if (transferSyntaxes.length === 0) throw new PduError(`presentation context ${id} offers no transfer syntax`);
      presentationContexts.push({ id, abstractSyntax, transferSyntaxes });
    } else throw new PduError(`unexpected item 0x${it.type.toString(16)} in A-ASSOCIATE-RQ`, AbortReason.UnexpectedPduParameter);
  }
  if (!applicationContext) throw new PduError("A-ASSOCIATE-RQ without application context item");
  if (!userInformation) throw new PduError("A-ASSOCIATE-RQ without user information item");
  return { protocolVersion: c.protocolVersion, calledAeTitle: c.calledAeTitle, callingAeTitle: c.callingAeTitle, applicationContext, presentationContexts, userInformation };
}

export function decodeAssociateAC(body: Uint8Array): AssociateAC {
  const c = decodeAssociateCommon(body, "A-ASSOCIATE-AC");
  let applicationContext: string | undefined;
  let userInformation: UserInformation | undefined;
  const presentationContexts: PresentationContextAnswer[] = [];
  for (const it of c.items) {
    if (it.type === ItemType.ApplicationContext) applicationContext = decodeUid(it.data);
    else if (it.type === ItemType.UserInformation) userInformation = decodeUserInformation(it.data);
    else if (it.type === ItemType.PresentationContextAC) {
      if (it.data.length < 4) throw new PduError("truncated presentation context item");
      const subs = readItems(it.data, 4, it.data.length, "presentation context item");
      const ts = subs.find((s) => s.type === ItemType.TransferSyntax);
      presentationContexts.push({ id: it.data[0]!, result: it.data[2]!, transferSyntax: ts ? decodeUid(ts.data) : "" });
    } else throw new PduError(`unexpected item 0x${it.type.toString(16)} in A-ASSOCIATE-AC`, AbortReason.UnexpectedPduParameter);
  }
  if (!applicationContext) throw new PduError("A-ASSOCIATE-AC without application context item");
  return {
    protocolVersion: c.protocolVersion,
    calledAeTitle: c.calledAeTitle,
    callingAeTitle: c.callingAeTitle,
    applicationContext,
    presentationContexts,
    userInformation: userInformation ?? { maxPduLength: 0, implementationClassUid: "", roleSelections: [], otherItems: [] },
  };
}

export function decodeAssociateRJ(body: Uint8Array): AssociateRJ {
  if (body.length !== 4) throw new PduError("A-ASSOCIATE-RJ must have 4 bytes");
  return { result: body[1]!, source: body[2]!, reason: body[3]! };
}

export function decodeAbort(body: Uint8Array): Abort {
  if (body.length !== 4) throw new PduError("A-ABORT must have 4 bytes");
  return { source: body[2]!, reason: body[3]! };
}
