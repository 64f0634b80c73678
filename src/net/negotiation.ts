/**
 * Presentation context negotiation (PS3.8 9.3.2.2, 9.3.3.2; PS3.7 D.3.3.4 role selection).
 * A pure function from the request and what our services support to the A-ASSOCIATE-AC answers.
 */
import { ItemType, PresentationContextResult, TransferSyntax } from "./constants.ts";
import type { AssociateRQ, PresentationContextAnswer, RoleSelection } from "./pdu.ts";

/**
 * Transfer syntaxes acceptable for an abstract syntax: a list in our order of preference, or a
 * predicate, in which case the requestor's first acceptable proposal wins (no transcoding: the
 * modality keeps the transfer syntax it prefers); "any" takes the requestor's first.
 */
export type TransferSyntaxPolicy = readonly string[] | "any" | { accept: (transferSyntax: string) => boolean };

export interface SupportedSyntaxes {
  /** Abstract syntax UID -> acceptable transfer syntaxes. */
  abstractSyntaxes: ReadonlyMap<string, TransferSyntaxPolicy>;
  /** Abstract syntaxes not in the map (e.g. every storage SOP class): their policy, or undefined if unsupported. */
  fallback?: (abstractSyntax: string) => TransferSyntaxPolicy | undefined;
  /** SOP classes for which we accept the SCP role for ourselves (C-GET storage sub-operations), PS3.7 D.3.3.4. */
  acceptScpRoleFor?: (sopClassUid: string) => boolean;
  /**
   * SOP Class Extended Negotiation (PS3.7 D.3.3.5): given the requested service-class application
   * information of a SOP class, what we accept (undefined = no answer item, i.e. nothing extended).
   */
  extendedNegotiation?: (sopClassUid: string, requested: Uint8Array) => Uint8Array | undefined;
}

/** An accepted SOP Class Extended Negotiation: the SOP class and the application information we answered. */
export interface ExtendedNegotiation {
  sopClassUid: string;
  info: Uint8Array;
}

/** For services without a data set or with small identifiers: prefer explicit VR little endian. */
export const UNCOMPRESSED_LITTLE_ENDIAN: readonly string[] = [TransferSyntax.ExplicitVRLittleEndian, TransferSyntax.ImplicitVRLittleEndian];

export function negotiatePresentationContexts(
  rq: AssociateRQ,
  supported: SupportedSyntaxes,
): { presentationContexts: PresentationContextAnswer[]; roleSelections: RoleSelection[]; extendedNegotiations: ExtendedNegotiation[] } {
  const presentationContexts = rq.presentationContexts.map((pc): PresentationContextAnswer => {
    const policy = policyFor(supported, pc.abstractSyntax);
    if (!policy) return { id: pc.id, result: PresentationContextResult.AbstractSyntaxNotSupported, transferSyntax: pc.transferSyntaxes[0]! };
    const chosen =
      policy === "any"
        ? pc.transferSyntaxes[0]
        : Array.isArray(policy)
          ? policy.find((ts) => pc.transferSyntaxes.includes(ts))
          : pc.transferSyntaxes.find((ts) => (policy as { accept: (ts: string) => boolean }).accept(ts));
    if (!chosen) return { id: pc.id, result: PresentationContextResult.TransferSyntaxesNotSupported, transferSyntax: pc.transferSyntaxes[0]! };
    return { id: pc.id, result: PresentationContextResult.Acceptance, transferSyntax: chosen };
  });
  // PS3.7 D.3.3.4: the acceptor answers each proposed role; it may only accept roles that were proposed.
  const roleSelections: RoleSelection[] = [];
  for (const r of rq.userInformation.roleSelections) {
    if (!policyFor(supported, r.sopClassUid)) continue;
    const scp = r.scp && (supported.acceptScpRoleFor?.(r.sopClassUid) ?? false);
    roleSelections.push({ sopClassUid: r.sopClassUid, scu: r.scu, scp });
  }
  // PS3.7 D.3.3.5: one answer per SOP class we support and have something to agree on.
  const extendedNegotiations: ExtendedNegotiation[] = [];
  for (const item of rq.userInformation.otherItems) {
    if (item.type !== ItemType.SopClassExtendedNegotiation || item.data.length < 2) continue;
    const n = (item.data[0]! << 8) | item.data[1]!;
    if (2 + n > item.data.length) continue;
    const sopClassUid = new TextDecoder("latin1").decode(item.data.subarray(2, 2 + n)).replace(/[\0 ]+$/, "");
    if (!policyFor(supported, sopClassUid)) continue;
    const info = supported.extendedNegotiation?.(sopClassUid, item.data.subarray(2 + n));
    if (info) extendedNegotiations.push({ sopClassUid, info });
  }
  return { presentationContexts, roleSelections, extendedNegotiations };
}

/** The user-information sub-item of an extended negotiation answer (PS3.7 D.3.3.5). */
export function encodeExtendedNegotiation(e: ExtendedNegotiation): { type: number; data: Uint8Array } {
  const uid = new TextEncoder().encode(e.sopClassUid);
  const data = new Uint8Array(2 + uid.length + e.info.length);
  data[0] = uid.length >> 8;
  data[1] = uid.length & 0xff;
  data.set(uid, 2);
  data.set(e.info, 2 + uid.length);
  return { type: ItemType.SopClassExtendedNegotiation, data };
}

function policyFor(supported: SupportedSyntaxes, abstractSyntax: string): TransferSyntaxPolicy | undefined {
  return supported.abstractSyntaxes.get(abstractSyntax) ?? supported.fallback?.(abstractSyntax);
}
