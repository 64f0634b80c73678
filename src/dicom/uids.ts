/** UIDs (PS3.5 9): their syntax, and matching of transfer syntaxes against Orthanc's `AcceptedTransferSyntaxes` patterns. */

/** A syntactically valid UID (PS3.5 9.1): digits and dots, no leading zeros in components, at most 64 chars. */
export function isValidUid(uid: string): boolean {
  return uid.length > 0 && uid.length <= 64 && /^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$/.test(uid);
}

/** Orthanc-style pattern (`*`, `?`) to a RegExp. */
function patternToRegExp(pattern: string): RegExp {
  return new RegExp("^" + pattern.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".") + "$");
}

/** True when `uid` matches one of the `AcceptedTransferSyntaxes` patterns. */
export function transferSyntaxMatcher(patterns: readonly string[]): (uid: string) => boolean {
  const res = patterns.map(patternToRegExp);
  return (uid) => res.some((r) => r.test(uid));
}
