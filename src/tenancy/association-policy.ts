/**
 * Who may associate with a tenant's listener, and with which presentation contexts.
 * A-ASSOCIATE-RJ reasons per PS3.8 9.3.4 (table 9-21).
 *
 * `AllowedCallers` binds calling AE titles to a host name, IP address or CIDR, like Orthanc's
 * `DicomCheckModalityHost`. Hosts and peers are read with shared/address.ts, the grammar config/ checks
 * `Host` with; the peer address is compared as an address: IPv4-mapped IPv6 peers ("::ffff:10.1.2.3",
 * what a dual-stack socket reports) match IPv4 rules. Host names are looked up
 * (node:dns lookup, every address) when the policy is created and again every `refreshMs`, because
 * negotiation is synchronous; a failed look-up keeps the previous addresses, and a name that was
 * never resolved matches no peer (fail closed). When every entry names a host, a connection from an
 * address outside all of them is closed at accept (`admitAddress`), before a byte of it is read.
 *
 * `Tls.RequireCallingAetInCertificate`: over TLS, the calling AE title must be the verified client
 * certificate's CN or one of its subject alternative names — the certificate vouches for the AE title,
 * not only for the connection (compared like every AE title, StrictAetComparison).
 */
import { lookup as dnsLookup } from "node:dns/promises";
import type { AllowedCaller, DicomSettings, TenantConfig } from "../config/types.ts";
import type { Negotiation, Peer } from "../net/association.ts";
import type { TlsPeer } from "../net/server.ts";
import { RejectReason, RejectResult, RejectSource } from "../net/reject.ts";
import { negotiatePresentationContexts, type SupportedSyntaxes } from "../net/negotiation.ts";
import type { AssociateRQ } from "../net/pdu.ts";
import { type AddressRange, inRange, parseAddress, parseCallerHost, singleAddress } from "../shared/address.ts";
import { aeTitlesEqual } from "./ae-title.ts";

/** An association policy: the negotiation function plus the host-name refresh it owns. */
export interface AssociationPolicy {
  (rq: AssociateRQ, peer: Peer): Negotiation;
  /** Settles once every host name of AllowedCallers was looked up once (successfully or not). */
  readonly ready: Promise<void>;
  /**
   * Whether a connection from `address` may go on at all: undefined when it may, else why not — when every
   * AllowedCallers entry is bound to a host and none of them is `address` (the listener then closes it at accept).
   */
  admitAddress(address: string): string | undefined;
  /** Stops the periodic host-name refresh. */
  close(): void;
}

export interface AssociationPolicyOptions {
  /** Addresses of a host name; default node:dns lookup with `all: true`. */
  lookup?: (host: string) => Promise<string[]>;
  /** How often host names are looked up again (default 60 s; 0 = only once). */
  refreshMs?: number;
  /** Time allowed for one look-up (default 5 s). */
  lookupTimeoutMs?: number;
  /** Called when a host name cannot be resolved (the previous addresses, if any, are kept). */
  onLookupError?(host: string, error: Error): void;
}

export function createAssociationPolicy(
  tenant: Pick<TenantConfig, "aet"> & Partial<Pick<TenantConfig, "allowedCallers" | "tls">>,
  dicom: Pick<DicomSettings, "checkCalledAet" | "strictAetComparison">,
  supported: SupportedSyntaxes,
  opts: AssociationPolicyOptions = {},
): AssociationPolicy {
  const callers = tenant.allowedCallers ? new CallerList(tenant.allowedCallers, dicom.strictAetComparison, opts) : undefined;
  const negotiate = (rq: AssociateRQ, peer: Peer): Negotiation => {
    if (dicom.checkCalledAet && !aeTitlesEqual(rq.calledAeTitle, tenant.aet, dicom.strictAetComparison)) {
      return {
        reject: { result: RejectResult.Permanent, source: RejectSource.ServiceUser, reason: RejectReason.CalledAeTitleNotRecognized },
        why: `called AE title "${rq.calledAeTitle}" is not this listener's AE title "${tenant.aet}"`,
      };
    }
    const tls = (peer as TlsPeer).tls;
    if (tls && tenant.tls?.requireCallingAetInCertificate) {
      const refusal = certificateRefusal(rq.callingAeTitle, tls, dicom.strictAetComparison);
      if (refusal !== undefined) {
        return {
          reject: { result: RejectResult.Permanent, source: RejectSource.ServiceUser, reason: RejectReason.CallingAeTitleNotRecognized },
          why: refusal,
        };
      }
    }
    if (callers) {
      const refusal = callers.check(rq.callingAeTitle, peer.address);
      if (refusal !== undefined) {
        return {
          reject: { result: RejectResult.Permanent, source: RejectSource.ServiceUser, reason: RejectReason.CallingAeTitleNotRecognized },
          why: refusal,
        };
      }
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
  return Object.assign(negotiate, {
    ready: callers?.ready ?? Promise.resolve(),
    admitAddress: (address: string) => callers?.admitAddress(address),
    close: () => callers?.close(),
  });
}

/** Why the client certificate does not vouch for `callingAe`, or undefined when it does. */
function certificateRefusal(callingAe: string, tls: NonNullable<TlsPeer["tls"]>, strict: boolean): string | undefined {
  if (!tls.authorized || tls.clientSubject === undefined) {
    const why = tls.clientSubject === undefined ? "none was presented" : `it did not verify: ${tls.authorizationError ?? "unknown reason"}`;
    return `calling AE title "${callingAe}" needs a verified client certificate naming it (Tls.RequireCallingAetInCertificate); ${why}`;
  }
  const names = [...(tls.clientCommonNames ?? []), ...(tls.clientAltNames ?? [])];
  if (names.some((n) => aeTitlesEqual(n, callingAe, strict))) return undefined;
  return `calling AE title "${callingAe}" is neither the CN nor a subject alternative name of the client certificate (${tls.clientSubject}) (Tls.RequireCallingAetInCertificate)`;
}

// ---- allowed callers ------------------------------------------------------------------------

interface CallerRule {
  aet: string;
  /** As configured, for messages. */
  host?: string;
  /** Address ranges the peer must be in; undefined = any address. */
  ranges?: AddressRange[];
  /** Set for host names: ranges are refreshed by look-ups. */
  hostName?: string;
}

class CallerList {
  private readonly rules: CallerRule[];
  private timer: ReturnType<typeof setInterval> | undefined;
  readonly ready: Promise<void>;

  constructor(
    callers: AllowedCaller[],
    private readonly strict: boolean,
    private readonly opts: AssociationPolicyOptions,
  ) {
    this.rules = callers.map((c) => {
      if (c.host === undefined || c.host.trim() === "") return { aet: c.aet };
      const where = parseCallerHost(c.host);
      if (where && "range" in where) return { aet: c.aet, host: c.host, ranges: [where.range] };
      // A host name; text that is no host name either (only possible without config/'s validation) is
      // looked up all the same, fails, and so matches no peer.
      return { aet: c.aet, host: c.host, ranges: [], hostName: where?.hostName ?? c.host.trim().toLowerCase() };
    });
    const names = [...new Set(this.rules.flatMap((r) => (r.hostName ? [r.hostName] : [])))];
    this.ready = names.length > 0 ? this.resolve(names) : Promise.resolve();
    const every = opts.refreshMs ?? 60_000;
    if (names.length > 0 && every > 0) {
      this.timer = setInterval(() => void this.resolve(names), every);
      (this.timer as { unref?: () => void }).unref?.();
    }
  }

  close(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  private async resolve(names: string[]): Promise<void> {
    const lookup = this.opts.lookup ?? defaultLookup;
    const timeoutMs = this.opts.lookupTimeoutMs ?? 5000;
    await Promise.all(
      names.map(async (name) => {
        let addresses: string[];
        try {
          addresses = await withTimeout(lookup(name), timeoutMs, `looking up ${name} took longer than ${timeoutMs} ms`);
        } catch (e) {
          this.opts.onLookupError?.(name, e instanceof Error ? e : new Error(String(e)));
          return;
        }
        const ranges = addresses.map(parseAddress).filter((a) => a !== undefined).map(singleAddress);
        for (const r of this.rules) if (r.hostName === name) r.ranges = ranges;
      }),
    );
  }

  /** Undefined when a connection from `peerAddress` may go on (some entry has no host, or one matches), else why not. */
  admitAddress(peerAddress: string): string | undefined {
    if (this.rules.some((r) => !r.ranges)) return undefined;
    const peer = parseAddress(peerAddress);
    if (peer && this.rules.some((r) => r.ranges!.some((range) => inRange(peer, range)))) return undefined;
    return `${peerAddress} is none of the hosts of AllowedCallers (${[...new Set(this.rules.map((r) => r.host))].join(", ")})`;
  }

  /** Undefined when allowed, else why not. */
  check(callingAe: string, peerAddress: string): string | undefined {
    const byAe = this.rules.filter((r) => aeTitlesEqual(r.aet, callingAe, this.strict));
    if (byAe.length === 0) return `calling AE title "${callingAe}" is not in AllowedCallers`;
    const peer = parseAddress(peerAddress);
    for (const r of byAe) {
      if (!r.ranges) return undefined;
      if (peer && r.ranges.some((range) => inRange(peer, range))) return undefined;
    }
    const hosts = byAe.map((r) => (r.hostName && r.ranges?.length === 0 ? `${r.host} (not resolved)` : r.host));
    return `calling AE title "${callingAe}" is allowed only from ${hosts.join(", ")}, not from ${peerAddress}`;
  }
}

async function defaultLookup(host: string): Promise<string[]> {
  const found = await dnsLookup(host, { all: true, verbatim: true });
  return found.map((a) => a.address);
}

function withTimeout<T>(p: Promise<T>, ms: number, message: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(message)), ms);
    (timer as { unref?: () => void }).unref?.();
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}
