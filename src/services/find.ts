/**
 * Query/Retrieve FIND SCP (PS3.4 C.4.1): Patient Root, Study Root and Patient/Study Only
 * information models, answered from Orthanc within the tenant's labels.
 *
 * Each match is sent as a Pending response as soon as its page arrives from Orthanc (one REST call
 * per page), unless `LimitFindResults` is set: then matches are held until the query is known to stay
 * within the limit, so that exceeding it answers a clean failure (0xA700) instead of a truncated list.
 * C-CANCEL stops the query at once (0xFE00); an Orthanc error or timeout answers 0xC000, a query the
 * models don't allow 0xA900, both with an ErrorComment. The handler never aborts the association.
 */
import type { FindSettings, TenantConfig } from "../config/types.ts";
import { identifierCharset, parseSpecificCharacterSet, unsupportedCharset } from "../dicom/charset.ts";
import { dictionaryEntry, parseOrthancTag, tagName } from "../dicom/dictionary.ts";
import { elementQueryText, elementText, encodeDataset, IdentifierError, parseDataset, type DataElement, type OutElement } from "../dicom/identifier.ts";
import { informationModelOf, queryRetrieveSopClasses } from "../dicom/sop-classes.ts";
import type { Logger } from "../shared/log.ts";
import { OrthancError } from "../orthanc/client.ts";
import { pinned, type OrthancApi } from "../orthanc/nodes.ts";
import { activeKeys, buildFindQuery, DICOM_LEVEL, FindQueryError, parentKeys, T, UNIQUE_KEY, type FindQuery, type FindResult, type OrthancValue, type RawKey } from "./find-matching.ts";
import { errorComment } from "./error-comment.ts";
import { FindLimitError, runFind } from "./find-orthanc.ts";
import type { OutOfScope } from "./scope-watch.ts";
import type { DimseHandler, DimseResponder } from "../net/association.ts";
import { Status } from "../net/constants.ts";

/** The abstract syntaxes a tenant negotiates for C-FIND. */
export const FIND_ABSTRACT_SYNTAXES: readonly string[] = queryRetrieveSopClasses("FIND");

/** Largest identifier accepted (identifiers are a few hundred bytes). */
const MAX_IDENTIFIER_BYTES = 1 << 20;

export interface FindHandlerOptions {
  tenant: TenantConfig;
  orthanc: OrthancApi;
  find: FindSettings;
  /** Orthanc's `DefaultEncoding`: the character set of identifiers without (0008,0005). */
  defaultEncoding: string;
  log?: Logger;
  /** Told of resources Orthanc answered outside the tenant's label filter (scope-watch.ts). */
  outOfScope?: OutOfScope;
}

class Cancelled extends Error {}

export function createFindHandler(opts: FindHandlerOptions): DimseHandler {
  return async (request, responder) => {
    const fail = (status: number, errorComment: string, offendingElement?: number) =>
      responder.respond({ status, errorComment, ...(offendingElement !== undefined ? { offendingElement: [offendingElement] } : {}) });

    const model = informationModelOf(request.command.affectedSopClassUid ?? request.presentationContext.abstractSyntax, "FIND");
    if (!model) {
      await fail(Status.SopClassNotSupported, `${request.command.affectedSopClassUid ?? "?"} is not a FIND SOP class`);
      return;
    }
    if (!request.dataset) {
      await fail(Status.IdentifierDoesNotMatchSopClass, "C-FIND request without an identifier");
      return;
    }
    let elements: DataElement[];
    try {
      elements = parseDataset(await request.dataset.readAll(MAX_IDENTIFIER_BYTES), request.presentationContext.transferSyntax);
    } catch (e) {
      if (request.signal.aborted && !(e instanceof IdentifierError)) throw e;
      await fail(Status.UnableToProcess, `cannot read the identifier: ${(e as Error).message}`);
      return;
    }

    const csElement = elements.find((e) => e.tag === T.SpecificCharacterSet);
    const declared = csElement ? parseSpecificCharacterSet(elementText(csElement, [])) : undefined;
    const unknown = declared && unsupportedCharset(declared);
    if (unknown !== undefined) {
      await fail(Status.UnableToProcess, `Specific Character Set "${unknown}" is not supported`, T.SpecificCharacterSet);
      return;
    }
    // Without (0008,0005) the requester's values are read, and answered, in Orthanc's DefaultEncoding;
    // they are read as Orthanc reads stored values, which they are matched against (dicom/charset.ts).
    const cs = identifierCharset(csElement?.bytes, declared, opts.defaultEncoding);
    const charset = cs.terms;
    const raw: RawKey[] = elements.map((e) => ({ tag: e.tag, vr: e.vr === "UN" ? (dictionaryEntry(e.tag)?.vr ?? "UN") : e.vr, value: e.items ? "" : elementQueryText(e, cs), sequence: e.items !== undefined }));
    const levelElement = elements.find((e) => e.tag === T.QueryRetrieveLevel);

    let query: FindQuery;
    try {
      // Combined date-time matching only when the association negotiated it (PS3.4 C.2.2.2.5.1).
      const extended = responder.association.extendedNegotiation.get(request.presentationContext.abstractSyntax);
      query = buildFindQuery(model, levelElement ? elementText(levelElement, []) : undefined, raw, { combinedDateTime: extended?.[1] === 1 });
    } catch (e) {
      if (!(e instanceof FindQueryError)) throw e;
      await fail(e.status, e.message, e.offendingElement);
      opts.log?.warn("C-FIND refused", { tenant: opts.tenant.aet, reason: e.detail });
      return;
    }

    // Audit: the level and the keys that carried a value (what was asked for, not what was returned).
    responder.audit({
      queryLevel: levelElement ? elementText(levelElement, []).trim() : undefined,
      keys: Object.fromEntries(raw.filter((k) => k.value !== "" && k.tag !== T.QueryRetrieveLevel && k.tag !== T.SpecificCharacterSet).map((k) => [tagName(k.tag), k.value])),
    });
    const limit = opts.find.limitFindResults;
    const held: Uint8Array[] = [];
    let count = 0;
    const ts = request.presentationContext.transferSyntax;
    try {
      // One Orthanc node for the query's pages (another one if it fails: nodes.ts).
      for await (const page of runFind(query, { orthanc: pinned(opts.orthanc), tenant: opts.tenant, settings: opts.find, signal: request.signal, outOfScope: opts.outOfScope })) {
        const { results } = page;
        for (let i = 0; i < results.length; i++) {
          if (request.signal.aborted) throw new Cancelled();
          count++;
          if (limit > 0 && count > limit) throw new FindLimitError(`more than ${limit} matches (LimitFindResults)`);
          const identifier = responseIdentifier(query, results[i]!, charset, ts, opts.tenant.aet);
          if (limit > 0) held.push(identifier);
          // A page's responses go out in one write: with the final response after the last page, else
          // with the page's last match.
          else await pending(responder, identifier, page.last || i < results.length - 1);
        }
      }
      if (request.signal.aborted) throw new Cancelled();
      for (const identifier of held) {
        if (request.signal.aborted) throw new Cancelled();
        await pending(responder, identifier, true);
      }
      responder.audit({ matches: count });
      await responder.respond({ status: Status.Success });
    } catch (e) {
      if (request.signal.aborted) {
        // C-CANCEL (PS3.4 C.4.1.2.3): the final response says Cancel. If the association ended
        // instead, this send fails and the association layer drops the operation.
        await responder.respond({ status: Status.Cancel });
        return;
      }
      if (e instanceof FindLimitError) {
        await fail(Status.OutOfResources, errorComment(`${e.message}: narrow the query`));
        opts.log?.warn("C-FIND over the limit", { tenant: opts.tenant.aet, limit });
        return;
      }
      if (e instanceof OrthancError) {
        const why = e.kind === "timeout" ? `Orthanc did not answer within ${Math.round(opts.find.timeoutMs / 1000)} s` : e.kind === "unreachable" ? "Orthanc is unreachable" : `Orthanc failed (${e.status ?? e.kind})`;
        await fail(Status.UnableToProcess, why);
        opts.log?.warn("C-FIND failed: Orthanc error", { tenant: opts.tenant.aet, error: e.message });
        return;
      }
      if (e instanceof Error && /association ended|connection closed|aborted by peer/.test(e.message)) throw e;
      await fail(Status.UnableToProcess, errorComment(`query failed: ${(e as Error).message}`));
      opts.log?.warn("C-FIND failed", { tenant: opts.tenant.aet, error: (e as Error).message });
    }
  };
}

function pending(responder: DimseResponder, identifier: Uint8Array, hold: boolean): Promise<void> {
  return responder.respond({ status: Status.Pending }, identifier, { hold });
}

/**
 * The identifier of one Pending response (PS3.4 C.4.1.1.3.2): exactly the requested keys (lower-level
 * keys zero-length), SpecificCharacterSet, QueryRetrieveLevel, RetrieveAETitle and the unique keys of
 * the levels above. Encoded in the requester's character set when every value fits, else ISO_IR 192.
 */
export function responseIdentifier(q: FindQuery, r: FindResult, charset: string[], transferSyntax: string, retrieveAeTitle: string): Uint8Array {
  const t = templateOf(q);
  const out: OutElement[] = [];
  for (const k of t.keys) {
    if (k.tag === T.InstanceAvailability) out.push({ tag: k.tag, vr: k.vr, text: "ONLINE" });
    else if (k.parent && !k.active) out.push({ tag: k.tag, vr: k.vr, text: stringOf(r.get(k.tag)) });
    else {
      const e = outElement(k.tag, k.vr, k.active ? (r.get(k.tag) ?? null) : null, k.sequence);
      // A requested unique key of a level above is never answered empty (PS3.4 C.4.1.1.3.2).
      out.push(k.parent && !e.text && !e.items ? { tag: k.tag, vr: k.vr, text: stringOf(r.get(k.tag)) } : e);
    }
  }
  for (const tag of t.addedParents) out.push({ tag, vr: tag === T.PatientID ? "LO" : "UI", text: stringOf(r.get(tag)) });
  out.push({ tag: T.QueryRetrieveLevel, vr: "CS", text: DICOM_LEVEL[q.level] }, { tag: T.RetrieveAETitle, vr: "AE", text: retrieveAeTitle });
  const cs: OutElement = { tag: T.SpecificCharacterSet, vr: "CS", text: charset.join("\\") };
  out.push(cs);
  const bytes = encodeDataset(out, transferSyntax, charset);
  if (bytes) return bytes;
  cs.text = "ISO_IR 192";
  const utf8 = encodeDataset(out, transferSyntax, ["ISO_IR 192"]);
  if (!utf8) throw new Error("cannot encode a C-FIND response in ISO_IR 192");
  return utf8;
}

interface TemplateKey {
  tag: number;
  vr: string;
  active: boolean;
  sequence: boolean;
  /** The unique key of the query level or a level above. */
  parent: boolean;
}

/** What every response to one query has in common: the keys in order, and which are answered from Orthanc. */
interface ResponseTemplate {
  keys: TemplateKey[];
  /** Unique keys of the levels above (and the level's own) that the query did not ask for. */
  addedParents: number[];
}

const templates = new WeakMap<FindQuery, ResponseTemplate>();

function templateOf(q: FindQuery): ResponseTemplate {
  let t = templates.get(q);
  if (t) return t;
  const active = new Set(activeKeys(q));
  const parents = [...parentKeys(q), UNIQUE_KEY[q.level]];
  const keys: TemplateKey[] = [];
  const seen = new Set<number>([T.QueryRetrieveLevel, T.RetrieveAETitle, T.SpecificCharacterSet]);
  for (const k of q.keys) {
    if (seen.has(k.tag)) continue;
    seen.add(k.tag);
    keys.push({ tag: k.tag, vr: k.vr === "UN" ? (dictionaryEntry(k.tag)?.vr ?? "UN") : k.vr, active: active.has(k), sequence: k.sequence, parent: parents.includes(k.tag) });
  }
  t = { keys, addedParents: parents.filter((tag) => !seen.has(tag)) };
  templates.set(q, t);
  return t;
}

function stringOf(v: OrthancValue | undefined): string {
  return typeof v === "string" ? v : "";
}

function outElement(tag: number, vr: string, value: OrthancValue, sequence: boolean): OutElement {
  if (sequence || vr === "SQ" || Array.isArray(value)) {
    return { tag, vr: "SQ", items: Array.isArray(value) ? value.map(itemElements) : [] };
  }
  return { tag, vr, text: value ?? "" };
}

/** A sequence item as Orthanc gives it in `Short` form ({"gggg,eeee": value}). */
function itemElements(item: Record<string, unknown>): OutElement[] {
  const els: OutElement[] = [];
  for (const [k, v] of Object.entries(item)) {
    const tag = parseOrthancTag(k);
    if (tag === undefined) continue;
    const vr = dictionaryEntry(tag)?.vr;
    if (!vr || vr === "OB" || vr === "OW" || vr === "UN") continue; // binary or unknown: not something a query returns
    if (Array.isArray(v)) els.push({ tag, vr: "SQ", items: (v as Record<string, unknown>[]).map(itemElements) });
    else if (typeof v === "string" || v === null) els.push({ tag, vr, text: v ?? "" });
  }
  return els;
}
