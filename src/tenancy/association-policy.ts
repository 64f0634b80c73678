/**
 * Who may associate with a tenant's listener, and with which presentation contexts.
 * A-ASSOCIATE-RJ reasons per PS3.8 9.3.4 (table 9-21).
 */
import type { DicomSettings, TenantConfig } from "../config/types.ts";
import type { Negotiation, Peer } from "../dimse/association.ts";
import { RejectReason, RejectResult, RejectSource } from "../dimse/constants.ts";
import { negotiatePresentationContexts, type SupportedSyntaxes } from "../dimse/negotiation.ts";
import type { AssociateRQ } from "../dimse/pdu.ts";
import { aeTitlesEqual } from "./ae-title.ts";

export function createAssociationPolicy(
  tenant: Pick<TenantConfig, "aet">,
  dicom: Pick<DicomSettings, "checkCalledAet" | "strictAetComparison">,
  supported: SupportedSyntaxes,
): (rq: AssociateRQ, peer: Peer) => Negotiation {
  return (rq) => {
    if (dicom.checkCalledAet && !aeTitlesEqual(rq.calledAeTitle, tenant.aet, dicom.strictAetComparison)) {
      return {
        reject: { result: RejectResult.Permanent, source: RejectSource.ServiceUser, reason: RejectReason.CalledAeTitleNotRecognized },
        why: `called AE title "${rq.calledAeTitle}" is not this listener's AE title "${tenant.aet}"`,
      };
    }
    const answer = negotiatePresentationContexts(rq, supported);
    if (!answer.presentationContexts.some((pc) => pc.result === 0)) {
      // Accepting an association with no usable context helps nobody; PS3.8 allows rejecting it (no reason given).
      return {
        reject: { result: RejectResult.Permanent, source: RejectSource.ServiceUser, reason: RejectReason.NoReasonGiven },
        why: `none of the ${rq.presentationContexts.length} proposed presentation contexts is supported (${[...new Set(rq.presentationContexts.map((p) => p.abstractSyntax))].slice(0, 5).join(", ")})`,
      };
    }
    return { accept: answer };
  };
}
