/**
 * Who may associate with a tenant's listener, and with which presentation contexts.
 * A-ASSOCIATE-RJ reasons per PS3.8 9.3.4 (table 9-21).
 *
 * `AllowedCallers` binds calling AE titles to a host name, IP address or CIDR, like Orthanc's
 * `DicomCheckModalityHost`. The peer address is compared as an address: IPv4-mapped IPv6 peers
 * ("::ffff:10.1.2.3", what a dual-stack socket reports) match IPv4 rules. Host names are looked up
 * (node:dns lookup, every address) when the policy is created and again every `refreshMs`, because
 * negotiation is synchronous; a failed look-up keeps the previous addresses, and a name that was
 * never resolved matches no peer (fail closed).
 */
import { lookup as dnsLookup } from "node:dns/promises";
import { isIP } from "node:net";
import type { AllowedCaller, DicomSettings, TenantConfig } from "../config/types.ts";
import type { Negotiation, Peer } from "../net/association.ts";
import { RejectReason, RejectResult, RejectSource } from "../net/reject.ts";
import { negotiatePresentationContexts, type SupportedSyntaxes } from "../net/negotiation.ts";
import type { AssociateRQ } from "../net/pdu.ts";
import { aeTitlesEqual } from "./ae-title.ts";

/** An association policy: the negotiation function plus the host-name refresh it owns. */
export interface AssociationPolicy {
  (rq: AssociateRQ, peer: Peer): Negotiation;
  /** Settles once every host name of AllowedCallers was looked up once (successfully or not). */
  readonly ready: Promise<void>;
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
  tenant: Pick<TenantConfig, "aet"> & Partial<Pick<TenantConfig, "allowedCallers">>,
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
    close: () => callers?.close(),
  });
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
      const range = parseAddressRange(c.host);
      if (range) return { aet: c.aet, host: c.host, ranges: [range] };
      return { aet: c.aet, host: c.host, ranges: [], hostName: c.host.trim().toLowerCase() };
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
        const ranges = addresses.map(parseAddressRange).filter((r): r is AddressRange => r !== undefined);
        for (const r of this.rules) if (r.hostName === name) r.ranges = ranges;
      }),
    );
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

// ---- addresses ------------------------------------------------------------------------------

/** An IP address as bytes: 4 for IPv4 (IPv4-mapped IPv6 addresses included), 16 for IPv6. */
export type IpAddress = Uint8Array;

export interface AddressRange {
  address: IpAddress;
  /** Prefix length in bits. */
  prefix: number;
}

/**
 * Parses an IPv4 or IPv6 address ("[...]" brackets and "%zone" allowed); IPv4-mapped IPv6
 * addresses become IPv4. Undefined when not an address.
 */
export function parseAddress(text: string): IpAddress | undefined {
  let s = text.trim();
  if (s.startsWith("[") && s.endsWith("]")) s = s.slice(1, -1);
  const zone = s.indexOf("%");
  if (zone >= 0) s = s.slice(0, zone);
  const kind = isIP(s);
  if (kind === 4) return new Uint8Array(s.split(".").map(Number));
  if (kind !== 6) return undefined;
  const v6 = parseIPv6(s);
  if (!v6) return undefined;
  return isV4Mapped(v6) ? v6.slice(12) : v6;
}

/** "a.b.c.d", "a.b.c.d/n", IPv6 and "IPv6/n"; undefined when the text is none of these (a host name). */
export function parseAddressRange(text: string): AddressRange | undefined {
  const s = text.trim();
  const slash = s.indexOf("/");
  const addrText = slash >= 0 ? s.slice(0, slash) : s;
  const prefixText = slash >= 0 ? s.slice(slash + 1) : undefined;
  let s2 = addrText;
  if (s2.startsWith("[") && s2.endsWith("]")) s2 = s2.slice(1, -1);
  const zone = s2.indexOf("%");
  if (zone >= 0) s2 = s2.slice(0, zone);
  const kind = isIP(s2);
  if (kind === 0) return undefined;
  const bits = kind === 4 ? 32 : 128;
  let prefix = bits;
  if (prefixText !== undefined) {
    if (!/^\d{1,3}$/.test(prefixText)) return undefined;
    prefix = Number(prefixText);
    if (prefix > bits) return undefined;
  }
  if (kind === 4) return { address: new Uint8Array(s2.split(".").map(Number)), prefix };
  const v6 = parseIPv6(s2);
  if (!v6) return undefined;
  // "::ffff:10.0.0.0/104" is the IPv4 range 10.0.0.0/8.
  if (isV4Mapped(v6) && prefix >= 96) return { address: v6.slice(12), prefix: prefix - 96 };
  return { address: v6, prefix };
}

export function inRange(address: IpAddress, range: AddressRange): boolean {
  if (address.length !== range.address.length) return false;
  let bits = range.prefix;
  for (let i = 0; bits > 0; i++, bits -= 8) {
    const mask = bits >= 8 ? 0xff : (0xff << (8 - bits)) & 0xff;
    if ((address[i]! & mask) !== (range.address[i]! & mask)) return false;
  }
  return true;
}

function isV4Mapped(v6: Uint8Array): boolean {
  for (let i = 0; i < 10; i++) if (v6[i] !== 0) return false;
  return v6[10] === 0xff && v6[11] === 0xff;
}

/** A syntactically valid IPv6 address (checked with isIP) to 16 bytes. */
function parseIPv6(s: string): Uint8Array | undefined {
  let text = s;
  // Embedded IPv4 in the last 32 bits ("::ffff:1.2.3.4"): rewrite it as two hexadecimal words.
  const lastColon = text.lastIndexOf(":");
  if (text.slice(lastColon + 1).includes(".")) {
    const v4 = text.slice(lastColon + 1).split(".").map(Number);
    text = `${text.slice(0, lastColon + 1)}${((v4[0]! << 8) | v4[1]!).toString(16)}:${((v4[2]! << 8) | v4[3]!).toString(16)}`;
  }
  const halves = text.split("::");
  if (halves.length > 2) return undefined;
  const words = (part: string) => (part === "" ? [] : part.split(":").map((h) => parseInt(h, 16)));
  const head = words(halves[0]!);
  const rest = halves.length === 2 ? words(halves[1]!) : [];
  const fill = halves.length === 2 ? 8 - head.length - rest.length : 0;
  const all = [...head, ...new Array<number>(Math.max(0, fill)).fill(0), ...rest];
  if (all.length !== 8 || all.some((w) => !(w >= 0 && w <= 0xffff))) return undefined;
  const out = new Uint8Array(16);
  all.forEach((w, i) => {
    out[2 * i] = w >> 8;
    out[2 * i + 1] = w & 0xff;
  });
  return out;
}
