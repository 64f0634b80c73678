/**
 * The identifier of a C-MOVE or C-GET request (PS3.4 C.4.2.1.4, C.4.3.1.3): read by the one identifier
 * reader (dicom/identifier.ts), its unique keys checked against the information model of the request's
 * SOP class, and what was asked for, for the audit trail.
 */
import type { DimseRequest } from "../net/association.ts";
import { Status, TransferSyntax } from "../net/constants.ts";
import { identifierCharset, parseSpecificCharacterSet, type IdentifierCharset } from "../dicom/charset.ts";
import { elementText, elementValues, parseDataset, type DataElement } from "../dicom/identifier.ts";
import { informationModelOf, type InformationModel } from "../dicom/sop-classes.ts";
import type { RetrieveKeys, RetrieveLevel } from "./resolve.ts";

/** A request the handler refuses before any sub-operation: status and ErrorComment. */
/** A retrieve answered before any sub-operation: its status, the ErrorComment (`message`) and, for the log, the detail. */
export class RetrieveRefusal extends Error {
  override name = "RetrieveRefusal";
  constructor(
    readonly status: number,
    message: string,
    readonly detail?: string,
  ) {
    super(message);
  }
}

/** Largest identifier accepted (identifiers are a few hundred bytes). */
const MAX_IDENTIFIER_BYTES = 1 << 20;

/** Reads an identifier data set (implicit or explicit VR, as negotiated); every length is checked before anything is taken. */
export function decodeIdentifier(bytes: Uint8Array, transferSyntax: string): DataElement[] {
  if (transferSyntax !== TransferSyntax.ImplicitVRLittleEndian && transferSyntax !== TransferSyntax.ExplicitVRLittleEndian && transferSyntax !== TransferSyntax.ExplicitVRBigEndian) {
    throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, `identifier transfer syntax ${transferSyntax} is not supported`);
  }
  try {
    return parseDataset(bytes, transferSyntax);
  } catch (e) {
    throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, `identifier cannot be decoded: ${e instanceof Error ? e.message : String(e)}`);
  }
}

const UNIQUE = {
  level: 0x00080052,
  patientId: 0x00100020,
  study: 0x0020000d,
  series: 0x0020000e,
  sop: 0x00080018,
} as const;

function uidList(elements: readonly DataElement[], tag: number, name: string, charset: IdentifierCharset): string[] | undefined {
  const v = elementValues(elements, tag, charset);
  if (v === undefined || v.length === 0) return undefined;
  for (const uid of v) {
    if (/[*?]/.test(uid)) throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, `${name} must not contain wildcards`);
    if (uid.length > 64) throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, `${name} longer than 64 characters`);
  }
  return [...new Set(v)];
}

/**
 * The unique keys of a C-MOVE/C-GET identifier (PS3.4 C.4.2.2.1, C.6.1.2.2, C.6.2.2.2). Lenient like
 * Orthanc: the key of the retrieve level is required; keys of the levels above are used as further
 * constraints when present. Single-valued keys above the level and the absence of wildcards are enforced.
 * Text is read by the identifier's Specific Character Set, else Orthanc's `DefaultEncoding`, as Orthanc
 * reads the stored values the keys are looked up among.
 */
export function retrieveKeysOf(elements: readonly DataElement[], model: InformationModel, defaultEncoding = "Latin1"): RetrieveKeys {
  const cs = elements.find((e) => e.tag === 0x00080005);
  const charset = identifierCharset(cs?.bytes, cs ? parseSpecificCharacterSet(elementText(cs, [])) : undefined, defaultEncoding);
  const level = elementValues(elements, UNIQUE.level, charset)?.[0]?.toUpperCase();
  if (!level) throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, "Query/Retrieve Level (0008,0052) is missing");
  if (level !== "PATIENT" && level !== "STUDY" && level !== "SERIES" && level !== "IMAGE") {
    throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, `Query/Retrieve Level ${level} is not supported`);
  }
  if (model === "StudyRoot" && level === "PATIENT") throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, "level PATIENT is not part of the Study Root model");
  const pids = elementValues(elements, UNIQUE.patientId, charset);
  if (pids && pids.length > 1) throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, "Patient ID must be a single value");
  const patientId = pids?.[0];
  if (patientId !== undefined && /[*?\\]/.test(patientId)) throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, "Patient ID must not contain wildcards");
  const keys: RetrieveKeys = {
    level: level as RetrieveLevel,
    patientId,
    studyInstanceUids: uidList(elements, UNIQUE.study, "Study Instance UID", charset),
    seriesInstanceUids: level === "SERIES" || level === "IMAGE" ? uidList(elements, UNIQUE.series, "Series Instance UID", charset) : undefined,
    sopInstanceUids: level === "IMAGE" ? uidList(elements, UNIQUE.sop, "SOP Instance UID", charset) : undefined,
  };
  const required: Record<RetrieveLevel, [unknown, string]> = {
    PATIENT: [keys.patientId, "Patient ID (0010,0020)"],
    STUDY: [keys.studyInstanceUids, "Study Instance UID (0020,000D)"],
    SERIES: [keys.seriesInstanceUids, "Series Instance UID (0020,000E)"],
    IMAGE: [keys.sopInstanceUids, "SOP Instance UID (0008,0018)"],
  };
  const [value, name] = required[keys.level];
  if (value === undefined) throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, `level ${keys.level} needs ${name}`);
  // Above the retrieve level a unique key has a single value (PS3.4 C.4.2.2.1).
  if (keys.level !== "STUDY" && keys.studyInstanceUids && keys.studyInstanceUids.length > 1) {
    throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, "Study Instance UID must be a single value above the STUDY level");
  }
  if (keys.level === "IMAGE" && keys.seriesInstanceUids && keys.seriesInstanceUids.length > 1) {
    throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, "Series Instance UID must be a single value at the IMAGE level");
  }
  return keys;
}

/** The information model of a MOVE or GET SOP class (either serves either request, as it always has). */
function retrieveModelOf(sopClassUid: string): InformationModel | undefined {
  return informationModelOf(sopClassUid, "MOVE") ?? informationModelOf(sopClassUid, "GET");
}

/** Reads, decodes and checks the identifier of a C-MOVE/C-GET request. Throws RetrieveRefusal. */
export async function readRetrieveKeys(request: DimseRequest, defaultEncoding?: string): Promise<RetrieveKeys> {
  const sopClass = request.command.affectedSopClassUid ?? request.presentationContext.abstractSyntax;
  const model = retrieveModelOf(sopClass) ?? retrieveModelOf(request.presentationContext.abstractSyntax);
  if (!model) throw new RetrieveRefusal(Status.SopClassNotSupported, `SOP class ${sopClass} is not a retrieve SOP class`);
  if (!request.dataset) throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, "the request has no identifier");
  let bytes: Uint8Array;
  try {
    bytes = await request.dataset.readAll(MAX_IDENTIFIER_BYTES);
  } catch (e) {
    throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, e instanceof RangeError ? "identifier larger than 1 MiB" : `identifier not received: ${(e as Error).message}`);
  }
  return retrieveKeysOf(decodeIdentifier(bytes, request.presentationContext.transferSyntax), model, defaultEncoding);
}

/** What a retrieve asked for, for the audit trail (UID lists are kept; they identify what was asked). */
export function auditKeys(keys: RetrieveKeys): Record<string, unknown> {
  return {
    queryLevel: keys.level,
    ...(keys.patientId !== undefined ? { patientId: keys.patientId } : {}),
    ...(keys.studyInstanceUids ? { studyInstanceUid: keys.studyInstanceUids.join("\\") } : {}),
    ...(keys.seriesInstanceUids ? { seriesInstanceUid: keys.seriesInstanceUids.join("\\") } : {}),
    ...(keys.sopInstanceUids ? { sopInstanceUid: keys.sopInstanceUids.join("\\") } : {}),
  };
}
