/**
 * IP addresses, CIDR ranges and host names as text: the one grammar for where a caller may connect from.
 * config/ checks `AllowedCallers[].Host` with it when the file is loaded, and tenancy/'s association policy
 * matches peers with it, so a Host the configuration accepts is exactly what the policy matches.
 * Runtime-agnostic (no node:net): Bun, Deno and Node read addresses the same way.
 *
 * - IPv4: a dotted quad of decimal octets without leading zeros (some systems read "010" as octal).
 * - IPv6: the text forms of RFC 4291 section 2.2 (`::` compression; a dotted quad only as the last 32 bits);
 *   no zone index and no brackets in a configuration.
 * - CIDR: `address/prefix` (RFC 4632, RFC 4291 section 2.3), prefix 0-32 or 0-128 without leading zeros;
 *   host bits may be set (10.0.0.5/24 is 10.0.0.0/24).
 * - Host name: RFC 1123 labels (`_` tolerated, as some networks use it); the last label is not all digits,
 *   so a mistyped address ("10.0.0.256") is never taken for a name.
 *
 * IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what a dual-stack socket reports for an IPv4 peer) is read as IPv4,
 * so IPv4 rules match such peers; `::ffff:10.0.0.0/104` is the IPv4 range 10.0.0.0/8.
 */

/** An IP address as bytes: 4 for IPv4 (IPv4-mapped IPv6 addresses included), 16 for IPv6. */
export type IpAddress = Uint8Array;

/** The addresses whose first `prefix` bits are those of `address`. */
export interface AddressRange {
  address: IpAddress;
  /** Prefix length in bits: 0-32 for IPv4, 0-128 for IPv6. */
  prefix: number;
}

/** Where a caller may connect from: an address range (an address is a range of one), or a host name to look up. */
export type CallerHost = { range: AddressRange } | { hostName: string };

const OCTET = /^(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$/;
const HEX_GROUP = /^[0-9A-Fa-f]{1,4}$/;
const PREFIX = /^(?:0|[1-9][0-9]{0,2})$/;
const HOST_LABEL = /^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$/;

/** A dotted-quad IPv4 address to its 4 bytes; undefined when `text` is not one. */
export function parseIPv4(text: string): Uint8Array | undefined {
  const parts = text.split(".");
  if (parts.length !== 4 || !parts.every((p) => OCTET.test(p))) return undefined;
  return Uint8Array.from(parts, Number);
}

/** An IPv6 address in RFC 4291 2.2 text form (no zone index) to its 16 bytes; undefined when `text` is not one. */
export function parseIPv6(text: string): Uint8Array | undefined {
  const halves = text.split("::");
  if (halves.length > 2) return undefined;
  const groupsOf = (part: string): string[] => (part === "" ? [] : part.split(":"));
  const head = groupsOf(halves[0]!);
  const tail = halves.length === 2 ? groupsOf(halves[1]!) : [];
  // A dotted quad may only end the text, where it fills the last two groups.
  const last = halves.length === 2 ? tail : head;
  let v4: Uint8Array | undefined;
  if (last.length > 0 && last[last.length - 1]!.includes(".")) {
    v4 = parseIPv4(last.pop()!);
    if (!v4) return undefined;
  }
  if (![...head, ...tail].every((g) => HEX_GROUP.test(g))) return undefined;
  const groups = head.length + tail.length + (v4 ? 2 : 0);
  // `::` stands for at least one group of zeros.
  if (halves.length === 2 ? groups > 7 : groups !== 8) return undefined;
  const out = new Uint8Array(16);
  const put = (words: string[], at: number) =>
    words.forEach((w, i) => {
      const n = parseInt(w, 16);
      out[at + 2 * i] = n >> 8;
      out[at + 2 * i + 1] = n & 0xff;
    });
  put(head, 0);
  const tailBytes = 2 * tail.length + (v4 ? 4 : 0);
  put(tail, 16 - tailBytes);
  if (v4) out.set(v4, 12);
  return out;
}

/** A host name (see the file's comment); not an address. */
export function isHostName(text: string): boolean {
  if (text.length > 253) return false;
  const labels = text.split(".");
  if (!labels.every((l) => HOST_LABEL.test(l))) return false;
  return !/^[0-9]+$/.test(labels[labels.length - 1]!);
}

/** `a.b.c.d`, IPv6, or either with `/prefix`, as configured; undefined when `text` is none of these (a host name, or nonsense). */
export function parseAddressRange(text: string): AddressRange | undefined {
  const s = text.trim();
  const slash = s.indexOf("/");
  if (slash !== s.lastIndexOf("/")) return undefined;
  const addressText = slash >= 0 ? s.slice(0, slash) : s;
  const v4 = parseIPv4(addressText);
  const address = v4 ?? parseIPv6(addressText);
  if (!address) return undefined;
  const bits = address.length * 8;
  let prefix = bits;
  if (slash >= 0) {
    const prefixText = s.slice(slash + 1);
    if (!PREFIX.test(prefixText)) return undefined;
    prefix = Number(prefixText);
    if (prefix > bits) return undefined;
  }
  return mappedToIPv4({ address, prefix });
}

/** `AllowedCallers[].Host`: an address range, or a host name (lower-cased: DNS names are case-insensitive); undefined when neither. */
export function parseCallerHost(text: string): CallerHost | undefined {
  const s = text.trim();
  const range = parseAddressRange(s);
  if (range) return { range };
  return isHostName(s) ? { hostName: s.toLowerCase() } : undefined;
}

/**
 * A peer's address as a socket or a resolver reports it: an IPv4 or IPv6 address, "[...]" brackets and a
 * "%zone" suffix allowed (the zone is not part of the address); IPv4-mapped IPv6 becomes IPv4.
 */
export function parseAddress(text: string): IpAddress | undefined {
  let s = text.trim();
  if (s.startsWith("[") && s.endsWith("]")) s = s.slice(1, -1);
  const zone = s.indexOf("%");
  if (zone >= 0) s = s.slice(0, zone);
  const address = parseIPv4(s) ?? parseIPv6(s);
  return address && mappedToIPv4({ address, prefix: address.length * 8 }).address;
}

/** The range of exactly one address. */
export function singleAddress(address: IpAddress): AddressRange {
  return { address, prefix: address.length * 8 };
}

/** Whether `address` is in `range`; an IPv4 address is never in an IPv6 range, nor the reverse. */
export function inRange(address: IpAddress, range: AddressRange): boolean {
  if (address.length !== range.address.length) return false;
  let bits = range.prefix;
  for (let i = 0; bits > 0; i++, bits -= 8) {
    const mask = bits >= 8 ? 0xff : (0xff << (8 - bits)) & 0xff;
    if ((address[i]! & mask) !== (range.address[i]! & mask)) return false;
  }
  return true;
}

/** An IPv4-mapped IPv6 range (::ffff:0:0/96 and inside it) as the IPv4 range it is; others unchanged. */
function mappedToIPv4(range: AddressRange): AddressRange {
  const a = range.address;
  if (a.length !== 16 || range.prefix < 96) return range;
  for (let i = 0; i < 10; i++) if (a[i] !== 0) return range;
  if (a[10] !== 0xff || a[11] !== 0xff) return range;
  return { address: a.slice(12), prefix: range.prefix - 96 };
}
