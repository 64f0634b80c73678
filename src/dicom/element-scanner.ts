/**
 * A strict, streaming scanner of a data set's structure (PS3.5 7): fed the bytes chunk by chunk as they
 * arrive (split anywhere, inside a header too), it walks every element, sequence and item and refuses
 * whatever a parser could read differently from another: top-level elements not in strictly ascending
 * tag order (PS3.5 7.1), unknown explicit VRs, lengths running past their container, undefined lengths
 * on VRs that cannot have one, item and delimitation tags out of place (PS3.5 7.5), encapsulated Pixel
 * Data not made of items (PS3.5 A.4), a data set ending inside an element.
 *
 * It holds no element value: values are skipped by counting, except the few top-level elements the
 * caller asks for (bounded), handed over as they complete. Per chunk it allocates nothing else: a 12-byte
 * carry buffer holds a header split across chunks, and the frames of nested sequences are reused.
 * Headers are read by the element codec (element-codec.ts), the one every reader of the gateway uses.
 */
import { headerForm, ITEM, ITEM_DELIMITATION, readElementHeader, SEQUENCE_DELIMITATION, UNDEFINED_LENGTH as UNDEFINED, VR, vrName, type ElementHeader } from "./element-codec.ts";
import { DatasetRefusal, RefusalStatus, tagName } from "./refusal.ts";
import { isKnownPublicTag, isSequenceTag } from "./dictionary.ts";

export const PIXEL_DATA = 0x7fe00010;

export interface ScannerOptions {
  /** Byte order of the data set (explicit VR big endian is the only big-endian syntax). */
  littleEndian: boolean;
  explicitVr: boolean;
  /** Encapsulated Pixel Data (undefined length, items of fragments) is allowed at (7FE0,0010). */
  encapsulated: boolean;
  /** Top-level tags whose values the caller wants: the VRs accepted (the first is the dictionary's) and the largest length. */
  capture: ReadonlyMap<number, CaptureSpec>;
  /** A captured value, complete, with its VR (the dictionary's in implicit VR). `value` is not reused. */
  onValue(tag: number, value: Uint8Array, vr: number): void;
  /** Called once, before the first top-level element whose tag is above `boundary` (or at the end). */
  boundary: number;
  onBoundary(): void;
}

export interface CaptureSpec {
  vrs: readonly number[];
  maxLength: number;
}

const enum Kind {
  Dataset,
  Item,
  Sequence,
  Fragments,
}

interface Frame {
  kind: Kind;
  /** Absolute offset where the frame ends; -1: undefined length (ends at its delimiter). */
  end: number;
  little: boolean;
  explicit: boolean;
  /** The element that opened it, for messages. */
  tag: number;
}

const enum Mode {
  Header,
  Skip,
  Capture,
}

/** Nesting beyond this is refused: no real data set comes near, and it bounds the work per byte. */
export const MAX_DEPTH = 64;

export class ElementScanner {
  /** Bytes consumed so far. */
  position = 0;
  private mode = Mode.Header;
  private remaining = 0;
  private readonly carry = new Uint8Array(12);
  private carryLength = 0;
  private readonly frames: Frame[] = [];
  private depth = 0;
  private lastTopTag = -1;
  /** The top-level element being read (named in refusals about its content). */
  private topTag = -1;
  private boundaryPassed = false;
  private captureTag = 0;
  private captureVr = 0;
  private captureBuffer: Uint8Array | undefined;
  private captureFilled = 0;
  /** The header being handled (one object, reused: parsing allocates nothing). */
  private readonly h: ElementHeader = { tag: 0, vr: 0, length: 0 };

  constructor(private readonly o: ScannerOptions) {
    this.frames.push({ kind: Kind.Dataset, end: -1, little: o.littleEndian, explicit: o.explicitVr, tag: -1 });
  }

  /** Scans the next bytes of the data set. Throws DatasetRefusal. */
  push(chunk: Uint8Array): void {
    let i = 0;
    const n = chunk.length;
    for (;;) {
      if (this.mode === Mode.Skip) {
        const take = Math.min(this.remaining, n - i);
        i += take;
        this.position += take;
        this.remaining -= take;
        if (this.remaining > 0) return;
        this.mode = Mode.Header;
      } else if (this.mode === Mode.Capture) {
        const take = Math.min(this.remaining, n - i);
        this.captureBuffer!.set(chunk.subarray(i, i + take), this.captureFilled);
        this.captureFilled += take;
        i += take;
        this.position += take;
        this.remaining -= take;
        if (this.remaining > 0) return;
        this.mode = Mode.Header;
        const value = this.captureBuffer!;
        this.captureBuffer = undefined;
        this.o.onValue(this.captureTag, value, this.captureVr);
      }
      this.closeFinishedFrames();
      if (i === n) return;
      // A header: straight from the chunk when it holds the longest header, else through the carry buffer.
      if (this.carryLength === 0 && n - i >= 12) {
        i += this.parseHeader(chunk, i, 12);
      } else {
        const before = this.carryLength;
        const add = Math.min(12 - before, n - i);
        for (let k = 0; k < add; k++) this.carry[before + k] = chunk[i + k]!; // no subarray view: nothing allocated per chunk
        this.carryLength += add;
        const used = this.parseHeader(this.carry, 0, this.carryLength);
        if (used === 0) {
          i += add; // all of the chunk is in the carry buffer, waiting for more
          return;
        }
        i += used - before;
        this.carryLength = 0;
      }
      this.handleHeader();
    }
  }

  /** The data set ended: refuses when it ended inside an element, item or sequence. */
  finish(): void {
    this.closeFinishedFrames();
    if (this.mode !== Mode.Header || this.carryLength > 0 || this.depth > 0) {
      const inHeader = this.mode === Mode.Header;
      // The innermost thing left open: the value being read, else the item or sequence.
      const tag = !inHeader ? this.h.tag : this.depth > 0 ? this.frames[this.depth]!.tag : -1;
      const inside = inHeader && this.depth === 0 ? "an element header" : this.topTag >= 0 ? `element ${tagName(this.topTag)}` : "an element";
      throw new DatasetRefusal(
        RefusalStatus.CannotUnderstand,
        `Data set truncated inside ${inside}`.slice(0, 64),
        `the data set ends ${this.position} bytes in, inside ${inside}${tag !== this.topTag && tag >= 0 ? ` (at ${tagName(tag)})` : ""}: the modality sent an incomplete data set`,
        this.topTag >= 0 ? this.topTag : undefined,
      );
    }
    if (!this.boundaryPassed) {
      this.boundaryPassed = true;
      this.o.onBoundary();
    }
  }

  /** Reads a header at `b[o..o+avail)` into `h`: the bytes it took (8 or 12), or 0 when `avail` is too short to tell. */
  private parseHeader(b: Uint8Array, o: number, avail: number): number {
    const f = this.frames[this.depth]!;
    return readElementHeader(b, o, avail, f.little, f.explicit, this.h);
  }

  private refuse(comment: string, reason: string, status: number = RefusalStatus.CannotUnderstand): never {
    throw new DatasetRefusal(status, comment.slice(0, 64), reason, this.topTag >= 0 ? this.topTag : undefined);
  }

  /** "in sequence (0008,1140)" for refusals about nested content. */
  private where(): string {
    return this.topTag >= 0 && this.depth > 0 ? ` in ${tagName(this.topTag)}` : "";
  }

  private handleHeader(): void {
    const { tag, length, vr } = this.h;
    const f = this.frames[this.depth]!;
    const headerSize = vr !== 0 && headerForm(vr) === 2 ? 12 : 8;
    this.position += headerSize;
    if (f.end >= 0 && this.position > f.end) {
      this.refuse(`Element ${tagName(tag)} crosses the end of its item`, `the header of ${tagName(tag)}${this.where()} runs past the end of its item or sequence at byte ${f.end}`);
    }
    if (tag >>> 16 === 0xfffe) return this.handleItemTag(f, tag, length);
    if (f.kind === Kind.Sequence || f.kind === Kind.Fragments) {
      this.refuse(`Element ${tagName(tag)} found where an item was expected`, `${tagName(tag)}${this.where()} appears where PS3.5 7.5 allows only items and the sequence delimiter`);
    }
    if (f.explicit && headerForm(vr) === 0) {
      this.refuse(`Element ${tagName(tag)} has an unknown VR`, `${tagName(tag)}${this.where()} has the VR bytes 0x${hex4(vr)}, which no DICOM VR is (PS3.5 6.2)`);
    }
    if (this.depth === 0) {
      this.topLevel(tag);
      // Captured elements first: one encoded as a sequence (or with an undefined length) is refused, not skipped.
      const want = tag <= this.o.boundary ? this.o.capture.get(tag) : undefined;
      if (want) return this.startCapture(tag, vr, length, want);
    }
    if (length === UNDEFINED) return this.openUndefined(f, tag, vr);
    if (f.end >= 0 && this.position + length > f.end) {
      this.refuse(`Element ${tagName(tag)} length exceeds its item`, `${tagName(tag)}${this.where()} declares ${length} bytes, past the end of its item or sequence at byte ${f.end}`);
    }
    if (f.explicit ? vr === VR.SQ : isSequenceTag(tag)) {
      this.open(Kind.Sequence, tag, this.position + length, f.little, f.explicit);
      return;
    }
    this.mode = Mode.Skip;
    this.remaining = length;
  }

  private topLevel(tag: number): void {
    if (tag <= this.lastTopTag) {
      const repeated = tag === this.lastTopTag;
      this.refuse(
        repeated ? `Element ${tagName(tag)} repeated in the data set` : `Element ${tagName(tag)} out of order (after ${tagName(this.lastTopTag)})`,
        repeated
          ? `${tagName(tag)} appears twice at the top level of the data set; PS3.5 7.1 allows each element once, and parsers disagree on which one counts`
          : `${tagName(tag)} follows ${tagName(this.lastTopTag)}; PS3.5 7.1 requires increasing tag order, and parsers disagree on such data sets`,
      );
    }
    const group = tag >>> 16;
    if (group === 0x0000 || group === 0x0002) {
      this.refuse(`Element ${tagName(tag)} does not belong in a data set`, `${tagName(tag)} is a command or file meta element (group ${hex4(group)}), which a C-STORE data set must not contain (PS3.7 6.3.1, PS3.10 7.1)`);
    }
    this.lastTopTag = tag;
    this.topTag = tag;
    if (!this.boundaryPassed && tag > this.o.boundary) {
      this.boundaryPassed = true;
      this.o.onBoundary();
    }
  }

  private startCapture(tag: number, vr: number, length: number, want: CaptureSpec): void {
    if (!this.o.explicitVr) vr = want.vrs[0]!;
    else if (!want.vrs.includes(vr)) {
      const expected = vrName(want.vrs[0]!);
      this.refuse(`Element ${tagName(tag)} has VR ${vrName(vr)}, expected ${expected}`, `${tagName(tag)} is encoded with VR ${vrName(vr)} instead of ${expected} (PS3.6): how Orthanc reads it is not predictable`, RefusalStatus.DataSetMismatch);
    }
    if (length === UNDEFINED) {
      this.refuse(`Element ${tagName(tag)} has an undefined length`, `${tagName(tag)} has an undefined length, which its VR does not allow (PS3.5 7.1.2)`, RefusalStatus.DataSetMismatch);
    }
    if (length > want.maxLength) {
      this.refuse(`Element ${tagName(tag)} too long (${length} bytes)`, `${tagName(tag)} is ${length} bytes long; the gateway reads at most ${want.maxLength} (its VR allows far less)`, RefusalStatus.DataSetMismatch);
    }
    this.captureTag = tag;
    this.captureVr = vr;
    this.captureFilled = 0;
    this.remaining = length;
    if (length === 0) {
      this.o.onValue(tag, new Uint8Array(0), vr);
      return;
    }
    this.captureBuffer = new Uint8Array(length);
    this.mode = Mode.Capture;
  }

  /** An element of undefined length: a sequence, or encapsulated Pixel Data (PS3.5 7.5, A.4). */
  private openUndefined(f: Frame, tag: number, vr: number): void {
    // Nested Pixel Data too: an Icon Image Sequence's is encapsulated like the image's (PS3.5 A.4, PS3.3 F.7).
    if (tag === PIXEL_DATA) {
      if (this.o.encapsulated && f.explicit && (vr === VR.OB || vr === VR.OW)) {
        this.open(Kind.Fragments, tag, -1, f.little, f.explicit);
        return;
      }
      this.refuse(`Pixel Data has an undefined length`, `(7FE0,0010) has an undefined length, which PS3.5 A.4 allows only for OB/OW Pixel Data in an encapsulated transfer syntax`);
    }
    if (f.explicit) {
      // UN of undefined length holds a sequence in implicit VR little endian (PS3.5 6.2.2).
      if (vr === VR.SQ) return this.open(Kind.Sequence, tag, -1, f.little, true);
      if (vr === VR.UN) return this.open(Kind.Sequence, tag, -1, true, false);
      this.refuse(`Element ${tagName(tag)} has an undefined length`, `${tagName(tag)}${this.where()} has VR ${vrName(vr)} and an undefined length, which only SQ, UN and encapsulated Pixel Data may have (PS3.5 7.1.2)`);
    }
    // Implicit VR: an undefined length means a sequence; refused for elements the dictionary knows are not one.
    if (!isSequenceTag(tag) && !maybeSequence(tag)) {
      this.refuse(`Element ${tagName(tag)} has an undefined length`, `${tagName(tag)}${this.where()} has an undefined length in implicit VR, but it is not a sequence (PS3.6)`);
    }
    this.open(Kind.Sequence, tag, -1, f.little, false);
  }

  private open(kind: Kind, tag: number, end: number, little: boolean, explicit: boolean): void {
    if (this.depth === MAX_DEPTH) this.refuse(`Sequence ${tagName(tag)} nested too deeply`, `sequences and items are nested more than ${MAX_DEPTH} levels deep${this.where()}`);
    // Frames are made as nesting first needs them, then reused.
    if (++this.depth === this.frames.length) this.frames.push({ kind, end, little, explicit, tag });
    const g = this.frames[this.depth]!;
    g.kind = kind;
    g.end = end;
    g.little = little;
    g.explicit = explicit;
    g.tag = tag;
  }

  private handleItemTag(f: Frame, tag: number, length: number): void {
    if (f.kind === Kind.Dataset) {
      this.refuse(`Item tag ${tagName(tag)} at the top level`, `${tagName(tag)} appears among the top-level elements, outside any sequence (PS3.5 7.5)`);
    }
    if (tag === ITEM && f.kind !== Kind.Item) {
      if (length === UNDEFINED) {
        if (f.kind === Kind.Fragments) this.refuse("Pixel Data fragment of undefined length", "an item of encapsulated Pixel Data has an undefined length; PS3.5 A.4 requires defined lengths");
        this.open(Kind.Item, tag, -1, f.little, f.explicit);
        return;
      }
      if (f.end >= 0 && this.position + length > f.end) {
        this.refuse(`Item length exceeds its sequence${this.where()}`, `an item${this.where()} declares ${length} bytes, past the end of its sequence at byte ${f.end}`);
      }
      if (f.kind === Kind.Fragments) {
        this.mode = Mode.Skip;
        this.remaining = length;
        return;
      }
      this.open(Kind.Item, tag, this.position + length, f.little, f.explicit);
      return;
    }
    const closes = (tag === ITEM_DELIMITATION && f.kind === Kind.Item) || (tag === SEQUENCE_DELIMITATION && f.kind !== Kind.Item);
    if (!closes || f.end >= 0) {
      this.refuse(`Unexpected ${tagName(tag)}${this.where()}`.slice(0, 64), `${tagName(tag)}${this.where()} is not where PS3.5 7.5 allows it (${f.end >= 0 ? "in a container of defined length" : "wrong kind of delimiter"})`);
    }
    if (length !== 0) this.refuse(`Delimiter ${tagName(tag)} with a non-zero length`, `${tagName(tag)}${this.where()} has length ${length}; PS3.5 7.5 requires 0`);
    this.depth--;
  }

  /** Closes the items and sequences of defined length that end here. */
  private closeFinishedFrames(): void {
    while (this.depth > 0) {
      const f = this.frames[this.depth]!;
      if (f.end < 0 || this.position < f.end) return;
      this.depth--;
    }
  }
}

function hex4(n: number): string {
  return n.toString(16).padStart(4, "0").toUpperCase();
}

/** Private elements and public ones the dictionary does not know may be sequences in implicit VR. */
function maybeSequence(tag: number): boolean {
  return (tag >>> 16) % 2 === 1 || !isKnownPublicTag(tag);
}
