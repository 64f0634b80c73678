/**
 * Error Comment (0000,0902) is LO: at most 64 characters of the default repertoire (PS3.7 Annex C,
 * PS3.5 6.2), and the command set encoder cuts anything longer. A comment cut by the encoder can end
 * mid-word ("instance 1.2.826…4.1.2 is n"): the services write comments that fit instead, and keep the
 * long story (UIDs, Orthanc's own message, the fix) for the log.
 */

/** The longest Error Comment (VR LO). */
export const ERROR_COMMENT_MAX = 64;

/**
 * `text` when it fits; else cut at the last word boundary that leaves room for "...", so that what is
 * sent still reads as words. Control characters become spaces (LO allows none).
 */
export function errorComment(text: string): string {
  const clean = text.replace(/[\x00-\x1f\x7f]+/g, " ").replace(/\s+/g, " ").trim();
  if (clean.length <= ERROR_COMMENT_MAX) return clean;
  const room = ERROR_COMMENT_MAX - 3;
  const cut = clean.slice(0, room + 1);
  const boundary = Math.max(cut.lastIndexOf(" "), cut.lastIndexOf(":"), cut.lastIndexOf(","), cut.lastIndexOf(";"));
  const head = (boundary >= room / 2 ? cut.slice(0, boundary) : cut.slice(0, room)).replace(/[\s:,;]+$/, "");
  return `${head}...`;
}

/** `prefix` followed by `uid` when the whole fits, else `fallback` (a UID cut short names nothing). */
export function withUid(prefix: string, uid: string, fallback: string): string {
  const text = `${prefix}${uid}`;
  return text.length <= ERROR_COMMENT_MAX ? text : errorComment(fallback);
}

/** Why a sub-operation (or an operation) did not succeed: the comment the peer gets, the detail the log gets. */
export interface Failure {
  /** At most 64 characters (ERROR_COMMENT_MAX). */
  comment: string;
  /** Everything: UIDs, addresses, Orthanc's message, what to fix. */
  detail: string;
}

/** A Failure from a comment and its detail; the comment is fitted to 64 characters. */
export function failure(comment: string, detail: string = comment): Failure {
  return { comment: errorComment(comment), detail };
}
