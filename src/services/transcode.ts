/**
 * Retrieval to peers that do not accept the stored transfer syntax (C-MOVE destinations, C-GET
 * requesters): each instance goes in its stored transfer syntax when the peer accepts it, else in Explicit
 * or Implicit VR Little Endian, transcoded by Orthanc (`GET /instances/{id}/file?transcode=<uid>`, from
 * Orthanc 1.12.2, told by /system). Only ever towards an uncompressed syntax: nothing is re-compressed,
 * so no lossy compression can happen here (a lossy-compressed instance is decompressed as it is, its
 * Lossy Image Compression attributes kept by Orthanc). A syntax Orthanc cannot decode (JPEG 2000 without
 * its GDCM plugin) fails that sub-operation only (retrieve-stream.ts), with the reason in the log.
 */
import { versionAtLeast } from "../orthanc/client.ts";
import { PinnedOrthanc, type OrthancApi } from "../orthanc/nodes.ts";
import { TransferSyntax } from "../net/constants.ts";
import { failure, withUid } from "./error-comment.ts";
import type { ResolvedInstance } from "./resolve.ts";
import type { SendPlan } from "./retrieve-stream.ts";

/** The transfer syntaxes an instance may be transcoded to, in the order they are preferred. */
export const TRANSCODING_TARGETS: readonly string[] = [TransferSyntax.ExplicitVRLittleEndian, TransferSyntax.ImplicitVRLittleEndian];

/** The first Orthanc whose REST API transcodes a file on download (`?transcode=`). */
export const TRANSCODING_MIN_VERSION = "1.12.2";

/** How long Orthanc's /system answer is trusted before it is asked again (an upgrade is seen within this). */
const SYSTEM_TTL_MS = 60_000;

const known = new WeakMap<OrthancApi, { at: number; version: Promise<string | undefined> }>();

/**
 * Orthanc's version from /system (cached); undefined when it cannot be told (the download will say why).
 * An operation pinned to a node of a cluster (nodes.ts) asks that node's client, which outlives the
 * operation, so the answer is cached per node rather than asked again by every C-MOVE/C-GET.
 */
function orthancVersion(api: OrthancApi): Promise<string | undefined> {
  const orthanc = api instanceof PinnedOrthanc ? api.current.client : api;
  const now = Date.now();
  const k = known.get(orthanc);
  if (k && now - k.at < SYSTEM_TTL_MS) return k.version;
  const version = orthanc.system().then(
    (s) => (typeof s.Version === "string" ? s.Version : undefined),
    () => undefined,
  );
  known.set(orthanc, { at: now, version });
  return version;
}

/**
 * The plan of one instance for a peer that accepts `accepts(transferSyntax)`: as stored, else transcoded
 * to the first uncompressed syntax the peer accepts, else (or when Orthanc cannot transcode) a failure
 * naming what the peer lacks. `peer` names it in comments ("DEST", "the requester").
 */
export async function planTransfer(orthanc: OrthancApi, instance: ResolvedInstance, accepts: (transferSyntax: string) => boolean, peer: string): Promise<SendPlan> {
  if (accepts(instance.transferSyntax)) return { as: "stored" };
  const target = TRANSCODING_TARGETS.find(accepts);
  if (!target) {
    return {
      as: "none",
      failure: failure(
        withUid(`${peer} accepts neither uncompressed nor `, instance.transferSyntax, `${peer} accepts neither the stored syntax nor uncompressed`),
        `${peer} accepted no presentation context for SOP class ${instance.sopClassUid} in ${instance.transferSyntax} (stored) or in an uncompressed transfer syntax (${TRANSCODING_TARGETS.join(", ")}): instance ${instance.sopInstanceUid} not sent`,
      ),
    };
  }
  const version = await orthancVersion(orthanc);
  if (version !== undefined && !versionAtLeast(version, TRANSCODING_MIN_VERSION)) {
    return {
      as: "none",
      failure: failure(
        `Orthanc ${version} cannot transcode: upgrade to ${TRANSCODING_MIN_VERSION}+`,
        `${peer} does not accept ${instance.transferSyntax} (instance ${instance.sopInstanceUid}) and Orthanc ${version} cannot transcode on download (GET /instances/{id}/file?transcode= needs Orthanc ${TRANSCODING_MIN_VERSION} or newer): upgrade Orthanc, or have ${peer} accept ${instance.transferSyntax}`,
      ),
    };
  }
  return { as: "transcoded", transferSyntax: target };
}
