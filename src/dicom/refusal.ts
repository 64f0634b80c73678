/**
 * Why the gateway refuses a data set before acknowledging it: the C-STORE status to answer, an
 * ErrorComment (at most 64 characters, PS3.7 C.4.2) naming the element, and a longer reason for the log.
 */

/** C-STORE failure statuses (PS3.4 B.2.3). */
export const RefusalStatus = {
  /** 0xC000 Error: Cannot understand — the data set's encoding is broken or ambiguous. */
  CannotUnderstand: 0xc000,
  /** 0xA900 Error: Data Set does not match SOP Class — an attribute the gateway needs is missing or invalid. */
  DataSetMismatch: 0xa900,
} as const;

export class DatasetRefusal extends Error {
  override name = "DatasetRefusal";
  constructor(
    readonly status: number,
    /** ErrorComment (0000,0902): at most 64 characters. */
    readonly comment: string,
    /** For the log: cause and fix. */
    readonly reason: string,
    /** The top-level element concerned, if any. */
    readonly tag?: number,
  ) {
    super(reason);
    if (comment.length > 64) throw new RangeError(`ErrorComment longer than 64 characters: ${comment}`);
  }
}

/** "(0010,0020)" */
export function tagName(tag: number): string {
  return `(${hex4(tag >>> 16)},${hex4(tag & 0xffff)})`;
}

function hex4(n: number): string {
  return n.toString(16).padStart(4, "0").toUpperCase();
}
