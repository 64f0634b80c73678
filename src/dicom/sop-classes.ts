/**
 * The SOP classes the gateway knows (PS3.4, PS3.6 Annex A): the one registry every service and the
 * negotiation use — Verification, the storage classes, the Query/Retrieve classes by information model,
 * and Storage Commitment Push Model (for the Storage Commitment service to come).
 */

export const SopClass = {
  /** PS3.4 Annex A. */
  Verification: "1.2.840.10008.1.1",
  /** PS3.4 Annex J (N-ACTION / N-EVENT-REPORT). */
  StorageCommitmentPushModel: "1.2.840.10008.1.20.1",
  /** PS3.4 C.6.1: Patient Root Query/Retrieve Information Model. */
  PatientRootFind: "1.2.840.10008.5.1.4.1.2.1.1",
  PatientRootMove: "1.2.840.10008.5.1.4.1.2.1.2",
  PatientRootGet: "1.2.840.10008.5.1.4.1.2.1.3",
  /** PS3.4 C.6.2: Study Root Query/Retrieve Information Model. */
  StudyRootFind: "1.2.840.10008.5.1.4.1.2.2.1",
  StudyRootMove: "1.2.840.10008.5.1.4.1.2.2.2",
  StudyRootGet: "1.2.840.10008.5.1.4.1.2.2.3",
  /** PS3.4 C.6.3: Patient/Study Only Query/Retrieve Information Model (FIND; its MOVE and GET are retired). */
  PatientStudyOnlyFind: "1.2.840.10008.5.1.4.1.2.3.1",
} as const;

/** Query/Retrieve information models (PS3.4 C.6). */
export type InformationModel = "PatientRoot" | "StudyRoot" | "PatientStudyOnly";

/** The DIMSE-C operations of the Query/Retrieve service class (PS3.4 C.4). */
export type QueryRetrieveOperation = "FIND" | "MOVE" | "GET";

/** Each Query/Retrieve SOP class the gateway offers: its information model and operation. */
const QUERY_RETRIEVE = new Map<string, { model: InformationModel; operation: QueryRetrieveOperation }>([
  [SopClass.PatientRootFind, { model: "PatientRoot", operation: "FIND" }],
  [SopClass.StudyRootFind, { model: "StudyRoot", operation: "FIND" }],
  [SopClass.PatientStudyOnlyFind, { model: "PatientStudyOnly", operation: "FIND" }],
  [SopClass.PatientRootMove, { model: "PatientRoot", operation: "MOVE" }],
  [SopClass.StudyRootMove, { model: "StudyRoot", operation: "MOVE" }],
  [SopClass.PatientRootGet, { model: "PatientRoot", operation: "GET" }],
  [SopClass.StudyRootGet, { model: "StudyRoot", operation: "GET" }],
]);

/** The information model of a Query/Retrieve SOP class of the given operation, undefined for any other class. */
export function informationModelOf(sopClassUid: string, operation: QueryRetrieveOperation): InformationModel | undefined {
  const q = QUERY_RETRIEVE.get(sopClassUid);
  return q?.operation === operation ? q.model : undefined;
}

/** The Query/Retrieve SOP classes of one operation. */
export function queryRetrieveSopClasses(operation: QueryRetrieveOperation): readonly string[] {
  return [...QUERY_RETRIEVE].filter(([, q]) => q.operation === operation).map(([uid]) => uid);
}

/**
 * Standard storage SOP classes (PS3.4 Annex B, PS3.6 Annex A): every class under the storage root
 * 1.2.840.10008.5.1.4.1.1, plus the storage classes registered under other roots.
 */
const STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1.";
const OTHER_STORAGE_ROOTS = [
  "1.2.840.10008.5.1.4.34.", // RT Beams/Brachy Treatment Record, RT Ion Plan... delivery instructions (some)
  "1.2.840.10008.5.1.4.38.", // Hanging Protocol Storage
  "1.2.840.10008.5.1.4.39.", // Color Palette Storage
  "1.2.840.10008.5.1.4.43.", // Generic Implant Template Storage
  "1.2.840.10008.5.1.4.44.", // Implant Assembly Template Storage
  "1.2.840.10008.5.1.4.45.", // Implant Template Group Storage
];
/** Non-storage classes under OTHER_STORAGE_ROOTS (query/retrieve models of those roots). */
const NOT_STORAGE = new Set([
  "1.2.840.10008.5.1.4.34.6.2", "1.2.840.10008.5.1.4.34.6.3", "1.2.840.10008.5.1.4.34.6.4", "1.2.840.10008.5.1.4.34.6.5", // UPS push/watch/pull/event
  "1.2.840.10008.5.1.4.38.2", "1.2.840.10008.5.1.4.38.3", "1.2.840.10008.5.1.4.38.4", // Hanging Protocol Q/R
  "1.2.840.10008.5.1.4.39.2", "1.2.840.10008.5.1.4.39.3", "1.2.840.10008.5.1.4.39.4", // Color Palette Q/R
  "1.2.840.10008.5.1.4.43.2", "1.2.840.10008.5.1.4.43.3", "1.2.840.10008.5.1.4.43.4",
  "1.2.840.10008.5.1.4.44.2", "1.2.840.10008.5.1.4.44.3", "1.2.840.10008.5.1.4.44.4",
  "1.2.840.10008.5.1.4.45.2", "1.2.840.10008.5.1.4.45.3", "1.2.840.10008.5.1.4.45.4",
]);

export function isStandardStorageSopClass(uid: string): boolean {
  if (uid.startsWith(STORAGE_ROOT)) return true;
  return OTHER_STORAGE_ROOTS.some((r) => uid.startsWith(r)) && !NOT_STORAGE.has(uid);
}

/** The root of every UID the standard registers (PS3.5 9.1): a SOP class outside it is private. */
export const DICOM_UID_ROOT = "1.2.840.10008.";
