/**
 * The requestor (SCU) side of an association: against dcmtk storescp, against our own acceptor, and
 * against raw peers that misbehave (silence, oversized PDUs, abort).
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { decodeFileMeta } from "../src/dicom/part10.ts";
import type { DimseHandler } from "../src/net/association.ts";
import { AbortReason, CommandField, PduType, Status, TransferSyntax } from "../src/net/constants.ts";
import { RejectReason, RejectResult, RejectSource } from "../src/net/reject.ts";
import { handleEcho } from "../src/services/echo.ts";
import { UNCOMPRESSED_LITTLE_ENDIAN, type TransferSyntaxPolicy } from "../src/net/negotiation.ts";
import { decodeAbort, encodeAssociateAC, encodePDataHeader } from "../src/net/pdu.ts";
import { PduReader } from "../src/net/pdu-reader.ts";
import { AssociationAbortedError, AssociationError, AssociationRejectedError, RequestorAssociation } from "../src/net/requestor.ts";
import { DimseServer } from "../src/net/server.ts";
import { createAssociationPolicy } from "../src/tenancy/association-policy.ts";
import { datasetBytes } from "./helpers/dicom-files.ts";
import { pendingUntilCancelled } from "./helpers/handlers.ts";
import { freePort } from "./helpers/ports.ts";
import { startStorescp, type Storescp } from "./helpers/storescp.ts";

const CT = "/usr/lib/python3/dist-packages/pydicom/data/test_files/CT_small.dcm";
const CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2";
const VERIFICATION = "1.2.840.10008.1.1";
const STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1";

function ctFile() {
  const bytes = new Uint8Array(readFileSync(CT));
  return { meta: decodeFileMeta(bytes), dataset: datasetBytes(bytes) };
}

/** Yields `bytes` in small chunks, asynchronously, like a download. */
async function* chunked(bytes: Uint8Array, size = 1000): AsyncGenerator<Uint8Array> {
  for (let o = 0; o < bytes.length; o += size) {
    await Promise.resolve();
    yield bytes.subarray(o, o + size);
  }
}

describe("with dcmtk storescp", () => {
  let scp: Storescp;
  beforeAll(async () => {
    scp = await startStorescp("STORESCP");
  });
  afterAll(async () => {
    await scp?.stop();
  });

  test("C-ECHO and a streamed C-STORE; storescp receives the data set byte for byte; release", async () => {
    const ct = ctFile();
    const a = await RequestorAssociation.connect({
      host: "127.0.0.1",
      port: scp.port,
      calledAeTitle: "STORESCP",
      callingAeTitle: "GATEWAY",
      presentationContexts: [
        { abstractSyntax: VERIFICATION, transferSyntaxes: [TransferSyntax.ImplicitVRLittleEndian] },
        { abstractSyntax: CT_IMAGE_STORAGE, transferSyntaxes: [ct.meta.transferSyntaxUid] },
      ],
      connectTimeoutMs: 2000,
    });
    expect(a.presentationContexts.size).toBe(2);
    expect(a.peerMaxPduLength).toBeGreaterThan(0);
    const echo = await a.request(1, { commandField: CommandField.CEchoRQ, affectedSopClassUid: VERIFICATION });
    expect(echo.commandField).toBe(CommandField.CEchoRSP);
    expect(echo.status).toBe(Status.Success);
    const pc = a.findContext(CT_IMAGE_STORAGE, ct.meta.transferSyntaxUid)!;
    const rsp = await a.request(
      pc.id,
      { commandField: CommandField.CStoreRQ, affectedSopClassUid: CT_IMAGE_STORAGE, affectedSopInstanceUid: ct.meta.sopInstanceUid, priority: 0 },
      chunked(ct.dataset),
    );
    expect(rsp.status).toBe(Status.Success);
    expect(rsp.affectedSopInstanceUid).toBe(ct.meta.sopInstanceUid);
    await a.release();
    const got = scp.received().get(ct.meta.sopInstanceUid);
    expect(got).toBeDefined();
    expect(Buffer.compare(got!, ct.dataset)).toBe(0);
  });

  test("contexts storescp does not support are reported as rejected", async () => {
    const a = await RequestorAssociation.connect({
      host: "127.0.0.1",
      port: scp.port,
      calledAeTitle: "STORESCP",
      callingAeTitle: "GATEWAY",
      presentationContexts: [
        { abstractSyntax: VERIFICATION, transferSyntaxes: [TransferSyntax.ImplicitVRLittleEndian] },
        { abstractSyntax: "1.2.3.4.5.6.7", transferSyntaxes: [TransferSyntax.ImplicitVRLittleEndian] },
      ],
    });
    expect([...a.presentationContexts.keys()]).toEqual([1]);
    expect(a.rejectedContexts).toEqual([{ id: 3, abstractSyntax: "1.2.3.4.5.6.7", result: 3 }]);
    await a.release();
  });
});

describe("with our own acceptor", () => {
  let server: DimseServer;
  const never: DimseHandler = () => new Promise(() => {});
  const slowFind = pendingUntilCancelled(200, 10);
  let storedBytes = 0;
  const store: DimseHandler = async (req, res) => {
    for await (const chunk of req.dataset!) storedBytes += chunk.length;
    await res.respond({ status: Status.Success, affectedSopInstanceUid: req.command.affectedSopInstanceUid });
  };
  const crash: DimseHandler = async () => {
    throw new Error("boom");
  };

  beforeAll(async () => {
    const tenant = { aet: "ALPHA" };
    const dicom = { strictAetComparison: false, checkCalledAet: true };
    server = new DimseServer({
      label: "test acceptor",
      host: "127.0.0.1",
      port: 0,
      maxPduLength: 4096, // small: the requestor must fragment to it
      artimTimeoutMs: 2000,
      idleTimeoutMs: 5000,
      negotiate: createAssociationPolicy(tenant, dicom, {
        abstractSyntaxes: new Map<string, TransferSyntaxPolicy>([
          [VERIFICATION, UNCOMPRESSED_LITTLE_ENDIAN],
          [STUDY_ROOT_FIND, UNCOMPRESSED_LITTLE_ENDIAN],
          [CT_IMAGE_STORAGE, "any"],
          ["1.2.840.10008.5.1.4.1.2.2.2", UNCOMPRESSED_LITTLE_ENDIAN],
          ["1.2.840.10008.5.1.4.1.2.2.3", UNCOMPRESSED_LITTLE_ENDIAN],
        ]),
      }),
      handlers: new Map([
        [CommandField.CEchoRQ, handleEcho],
        [CommandField.CFindRQ, slowFind],
        [CommandField.CStoreRQ, store],
        [CommandField.CMoveRQ, never],
        [CommandField.CGetRQ, crash],
      ]),
    });
    await server.listen();
  });
  afterAll(async () => {
    await server.close();
  });

  const connect = (extra: Partial<Parameters<typeof RequestorAssociation.connect>[0]> = {}) =>
    RequestorAssociation.connect({
      host: "127.0.0.1",
      port: server.port,
      calledAeTitle: "ALPHA",
      callingAeTitle: "REQ",
      presentationContexts: [
        { abstractSyntax: VERIFICATION, transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] },
        { abstractSyntax: STUDY_ROOT_FIND, transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] },
        { abstractSyntax: CT_IMAGE_STORAGE, transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] },
        { abstractSyntax: "1.2.840.10008.5.1.4.1.2.2.2", transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] },
        { abstractSyntax: "1.2.840.10008.5.1.4.1.2.2.3", transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] },
      ],
      connectTimeoutMs: 2000,
      ...extra,
    });

  test("a rejection is a typed error with result, source and reason", async () => {
    const err = await connect({ calledAeTitle: "NOT-ALPHA" }).catch((e) => e);
    expect(err).toBeInstanceOf(AssociationRejectedError);
    expect(err.result).toBe(RejectResult.Permanent);
    expect(err.source).toBe(RejectSource.ServiceUser);
    expect(err.reason).toBe(RejectReason.CalledAeTitleNotRecognized);
    expect(err.message).toContain("called AE title not recognized");
  });

  test("a data set larger than the peer's maximum PDU is fragmented to it", async () => {
    const a = await connect();
    expect(a.peerMaxPduLength).toBe(4096);
    const ct = ctFile();
    storedBytes = 0;
    const rsp = await a.request(
      5,
      { commandField: CommandField.CStoreRQ, affectedSopClassUid: CT_IMAGE_STORAGE, affectedSopInstanceUid: ct.meta.sopInstanceUid, priority: 0 },
      ct.dataset,
    );
    expect(rsp.status).toBe(Status.Success);
    expect(storedBytes).toBe(ct.dataset.length);
    // Several requests in a row are queued one at a time.
    const echoes = await Promise.all([1, 2, 3].map(() => a.request(1, { commandField: CommandField.CEchoRQ, affectedSopClassUid: VERIFICATION })));
    expect(echoes.map((e) => e.status)).toEqual([0, 0, 0]);
    expect(new Set(echoes.map((e) => e.messageIdBeingRespondedTo)).size).toBe(3);
    await a.release();
  });

  test("Pending responses reach onPending; aborting the request's signal sends C-CANCEL", async () => {
    const a = await connect();
    const ctl = new AbortController();
    let pendings = 0;
    const rsp = await a.request(3, { commandField: CommandField.CFindRQ, affectedSopClassUid: STUDY_ROOT_FIND, priority: 0 }, Uint8Array.of(0x08, 0, 0x52, 0, 0x43, 0x53, 6, 0, ...new TextEncoder().encode("STUDY ")), {
      signal: ctl.signal,
      onPending: () => {
        if (++pendings === 3) ctl.abort();
      },
    });
    expect(rsp.status).toBe(Status.Cancel);
    expect(pendings).toBeGreaterThanOrEqual(3);
    expect(pendings).toBeLessThan(10);
    await a.release();
  });

  test("a peer that does not answer fails the request after dimseTimeoutMs", async () => {
    const a = await connect({ dimseTimeoutMs: 300 });
    const t0 = performance.now();
    const err = await a.request(7, { commandField: CommandField.CMoveRQ, affectedSopClassUid: "1.2.840.10008.5.1.4.1.2.2.2", moveDestination: "X", priority: 0 }, Uint8Array.of(0x08, 0, 0x52, 0, 0x43, 0x53, 6, 0, ...new TextEncoder().encode("STUDY "))).catch((e) => e);
    expect(err).toBeInstanceOf(AssociationError);
    expect(err.kind).toBe("timeout");
    expect(performance.now() - t0).toBeGreaterThanOrEqual(290); // after dimseTimeoutMs of silence, not before
    await a.closed;
  });

  test("an A-ABORT from the peer rejects the outstanding request", async () => {
    const a = await connect();
    const err = await a.request(9, { commandField: CommandField.CGetRQ, affectedSopClassUid: "1.2.840.10008.5.1.4.1.2.2.3", priority: 0 }, Uint8Array.of(0x08, 0, 0x52, 0, 0x43, 0x53, 6, 0, ...new TextEncoder().encode("STUDY "))).catch((e) => e);
    expect(err).toBeInstanceOf(AssociationAbortedError);
    expect(err.kind).toBe("aborted");
    await a.closed;
    expect(a.isEstablished).toBe(false);
  });
});

describe("connection failures and hostile peers", () => {
  test("nothing listening: fails at once with kind 'connect'", async () => {
    const port = await freePort();
    const t0 = performance.now();
    const err = await RequestorAssociation.connect({ host: "127.0.0.1", port, calledAeTitle: "X", callingAeTitle: "Y", presentationContexts: [{ abstractSyntax: VERIFICATION, transferSyntaxes: [TransferSyntax.ImplicitVRLittleEndian] }], connectTimeoutMs: 3000 }).catch((e) => e);
    expect(err).toBeInstanceOf(AssociationError);
    expect(err.kind).toBe("connect");
    expect(err.message).toContain("ECONNREFUSED");
    expect(performance.now() - t0).toBeLessThan(3000); // on the refusal, not at connectTimeoutMs
  });

  /** A peer that accepts TCP and then does whatever `onData` says. */
  async function rawPeer(onConnection: (s: Socket) => void): Promise<{ server: Server; port: number }> {
    const server = createServer(onConnection);
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
    return { server, port: (server.address() as { port: number }).port };
  }

  test("a peer that accepts TCP but never answers the A-ASSOCIATE-RQ fails within connectTimeoutMs", async () => {
    const sockets: Socket[] = [];
    const { server, port } = await rawPeer((s) => sockets.push(s));
    const t0 = performance.now();
    const err = await RequestorAssociation.connect({ host: "127.0.0.1", port, calledAeTitle: "X", callingAeTitle: "Y", presentationContexts: [{ abstractSyntax: VERIFICATION, transferSyntaxes: [TransferSyntax.ImplicitVRLittleEndian] }], connectTimeoutMs: 400 }).catch((e) => e);
    const ms = performance.now() - t0;
    expect(err.kind).toBe("connect");
    expect(err.message).toContain("within 400 ms");
    expect(ms).toBeGreaterThanOrEqual(390); // at connectTimeoutMs, not before
    sockets.forEach((s) => s.destroy());
    server.close();
  });

  test("a P-DATA-TF longer than our maximum PDU length is refused with A-ABORT before it is buffered", async () => {
    let abortSeen: { source: number; reason: number } | undefined;
    const { server, port } = await rawPeer((s) => {
      const reader = new PduReader({ maxPDataLength: 1 << 24, maxControlLength: 1 << 24 });
      s.on("error", () => {});
      s.on("data", (d: Uint8Array) => {
        for (const pdu of reader.push(d)) {
          if (pdu.type === PduType.AssociateRQ) {
            s.write(
              encodeAssociateAC({
                protocolVersion: 1,
                calledAeTitle: "X",
                callingAeTitle: "Y",
                applicationContext: "1.2.840.10008.3.1.1.1",
                presentationContexts: [{ id: 1, result: 0, transferSyntax: TransferSyntax.ImplicitVRLittleEndian }],
                userInformation: { maxPduLength: 16384, implementationClassUid: "1.2.3", roleSelections: [], otherItems: [] },
              }),
            );
          } else if (pdu.type === PduType.PData) {
            // Announce a 1 MB PDU: more than the 16384 bytes the requestor advertised.
            s.write(encodePDataHeader(1, true, true, 1 << 20));
            s.write(new Uint8Array(5000));
          } else if (pdu.type === PduType.Abort) abortSeen = decodeAbort(pdu.body);
        }
      });
    });
    const a = await RequestorAssociation.connect({ host: "127.0.0.1", port, calledAeTitle: "X", callingAeTitle: "Y", presentationContexts: [{ abstractSyntax: VERIFICATION, transferSyntaxes: [TransferSyntax.ImplicitVRLittleEndian] }], maxPduLength: 16384 });
    const err = await a.request(1, { commandField: CommandField.CEchoRQ, affectedSopClassUid: VERIFICATION }).catch((e) => e);
    expect(err.kind).toBe("protocol");
    expect(err.message).toContain("more than the 16384 bytes accepted");
    await a.closed;
    await new Promise((r) => setTimeout(r, 50));
    expect(abortSeen).toEqual({ source: 2, reason: AbortReason.InvalidPduParameterValue });
    server.close();
  });
});
