/**
 * Presentation context negotiation (PS3.8 9.3.2.2, 9.3.3.2; PS3.7 D.3.3.4 role selection).
 * A pure function from the request and what our services support to the A-ASSOCIATE-AC answers.
 */
import { PresentationContextResult, TransferSyntax } from "./constants.ts";
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
}

/** For services without a data set or with small identifiers: prefer explicit VR little endian. */
export const UNCOMPRESSED_LITTLE_ENDIAN: readonly string[] = [TransferSyntax.ExplicitVRLittleEndian, TransferSyntax.ImplicitVRLittleEndian];

export function negotiatePresentationContexts(
  rq: AssociateRQ,
  supported: SupportedSyntaxes,
): { presentationContexts: PresentationContextAnswer[]; roleSelections: RoleSelection[] } {
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
  return { presentationContexts, roleSelections };
}

function policyFor(supported: SupportedSyntaxes, abstractSyntax: string): TransferSyntaxPolicy | undefined {
  return supported.abstractSyntaxes.get(abstractSyntax) ?? supported.fallback?.(abstractSyntax);
}
