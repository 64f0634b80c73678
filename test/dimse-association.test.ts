/**
 * The DICOM upper layer against real peers (dcmtk echoscu, dcmjs-dimse) and hostile raw input.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { AssociationInfo, EndReason } from "../src/net/association.ts";
import { AbortReason, CommandField, NO_DATASET, PduType, Status, TransferSyntax } from "../src/net/constants.ts";
import { RejectReason } from "../src/net/reject.ts";
import { handleEcho } from "../src/services/echo.ts";
import { UNCOMPRESSED_LITTLE_ENDIAN } from "../src/net/negotiation.ts";
import { decodeAbort, decodeAssociateRJ, encodeReleaseRQ } from "../src/net/pdu.ts";
import { DimseServer } from "../src/net/server.ts";
import { createAssociationPolicy } from "../src/tenancy/association-policy.ts";
import { echoscu } from "./helpers/dcmtk.ts";
import { pendingUntilCancelled } from "./helpers/handlers.ts";
import { concat, RawPeer, VERIFICATION_CONTEXT } from "./helpers/raw-peer.ts";

const events: { kind: string; reason?: EndReason | string; detail?: string; status?: number }[] = [];
let server: DimseServer;

/** A handler for a test-only SOP class: answers Pending every 20 ms until cancelled. */
const slowFind = pendingUntilCancelled(500, 20);

beforeAll(async () => {
  const tenant = { aet: "ALPHA", port: 0, labels: [], labelsConstraint: "All" as const, labelsStoreLevels: [] };
  const dicom = { defaultAet: "ORTHANC", strictAetComparison: false, checkCalledAet: true, scpTimeoutSeconds: 1, maximumPduLength: 16384, defaultEncoding: "Latin1" };
  server = new DimseServer({
    label: "tenant ALPHA",
    host: "127.0.0.1",
    port: 0,
    maxPduLength: 16384,
    artimTimeoutMs: 500,
    idleTimeoutMs: 1000,
    negotiate: createAssociationPolicy(tenant, dicom, {
      abstractSyntaxes: new Map([
        ["1.2.840.10008.1.1", UNCOMPRESSED_LITTLE_ENDIAN],
        ["1.2.840.10008.5.1.4.1.2.2.1", UNCOMPRESSED_LITTLE_ENDIAN], // Study Root FIND, served by slowFind here
      ]),
    }),
    handlers: new Map([
      [CommandField.CEchoRQ, handleEcho],
      [CommandField.CFindRQ, slowFind],
    ]),
    observer: {
      accepted: () => events.push({ kind: "accepted" }),
      rejected: (_rq, _p, _rj, why) => events.push({ kind: "rejected", detail: why }),
      ended: (_i: AssociationInfo | undefined, _p, reason, detail) => events.push({ kind: "ended", reason, detail }),
      operation: (_i, service, status) => events.push({ kind: "operation", reason: service, status }),
    },
  });
  await server.listen();
});

afterAll(async () => {
  await server.close();
});

describe("with dcmtk echoscu", () => {
  test("C-ECHO succeeds", async () => {
    const r = await echoscu(server.port, "ALPHA");
    expect(r.code).toBe(0);
    expect(r.output).toContain("Received Echo Response (Success)");
  });

  test("called AE title comparison is case-insensitive by default", async () => {
    const r = await echoscu(server.port, "alpha");
    expect(r.code).toBe(0);
  });

  test("a wrong called AE title is rejected with reason 'called AE title not recognized'", async () => {
    const r = await echoscu(server.port, "NOT-ALPHA");
    expect(r.code).not.toBe(0);
    expect(r.output).toMatch(/Called AE Title Not Recognized/i);
    expect(events.some((e) => e.kind === "rejected" && e.detail?.includes("NOT-ALPHA"))).toBe(true);
  });

  test("many echoes on one association, then release", async () => {
    const r = await echoscu(server.port, "ALPHA", ["--repeat", "50"]);
    expect(r.code).toBe(0);
    expect(r.output.match(/Received Echo Response \(Success\)/g)?.length).toBe(50);
  });
});

describe("with dcmjs-dimse as an independent peer", () => {
  test("C-ECHO succeeds", async () => {
    const dimse = (await import("dcmjs-dimse")) as any;
    const { Client } = dimse.default ?? dimse;
    const { CEchoRequest } = (dimse.default ?? dimse).requests;
    (dimse.default ?? dimse).log.setLevel("error");
    const status = await new Promise<number>((resolve, reject) => {
      const client = new Client();
      const request = new CEchoRequest();
      request.on("response", (response: any) => resolve(response.getStatus()));
      client.on("networkError", (e: Error) => reject(e));
      client.addRequest(request);
      client.send("127.0.0.1", server.port, "DCMJS", "ALPHA");
    });
    expect(status).toBe(Status.Success);
  });
});

describe("protocol errors and timeouts (raw peer)", () => {
  test("an unknown PDU type is answered with A-ABORT reason 'unrecognized PDU'", async () => {
    const peer = await RawPeer.connect(server.port);
    peer.write(Uint8Array.of(0x42, 0, 0, 0, 0, 4, 1, 2, 3, 4));
    const pdu = await peer.next();
    expect(pdu?.type).toBe(PduType.Abort);
    expect(decodeAbort(pdu!.body)).toEqual({ source: 2, reason: AbortReason.UnrecognizedPdu });
    await peer.closedPromise;
  });

  test("a P-DATA-TF before association is an unexpected PDU", async () => {
    const peer = await RawPeer.connect(server.port);
    peer.write(Uint8Array.of(0x04, 0, 0, 0, 0, 6, 0, 0, 0, 2, 1, 3));
    const pdu = await peer.next();
    expect(pdu?.type).toBe(PduType.Abort);
    expect(decodeAbort(pdu!.body).reason).toBe(AbortReason.UnexpectedPdu);
  });

  test("an announced PDU length beyond our maximum is refused before any body is buffered", async () => {
    const peer = await RawPeer.connect(server.port);
    const ac = await peer.associate("ALPHA", [VERIFICATION_CONTEXT]);
    expect(ac?.type).toBe(PduType.AssociateAC);
    // 4 GB P-DATA announced, followed by junk: must abort at once.
    peer.write(Uint8Array.of(0x04, 0, 0xff, 0xff, 0xff, 0xf0, ...new Uint8Array(1000)));
    const pdu = await peer.next();
    expect(pdu?.type).toBe(PduType.Abort);
    expect(decodeAbort(pdu!.body).reason).toBe(AbortReason.InvalidPduParameterValue);
    await peer.closedPromise;
  });

  test("a P-DATA on a presentation context that was not accepted aborts", async () => {
    const peer = await RawPeer.connect(server.port);
    await peer.associate("ALPHA", [VERIFICATION_CONTEXT]);
    peer.sendCommand(3, { commandField: CommandField.CEchoRQ, messageId: 1, affectedSopClassUid: "1.2.840.10008.1.1", commandDataSetType: NO_DATASET });
    const pdu = await peer.next();
    expect(pdu?.type).toBe(PduType.Abort);
  });

  test("a malformed command set aborts the association, the server keeps serving", async () => {
    const peer = await RawPeer.connect(server.port);
    await peer.associate("ALPHA", [VERIFICATION_CONTEXT]);
    const junk = Uint8Array.of(0, 0, 0, 1, 0xff, 0xff, 0xff, 0x7f); // element length overruns
    const { encodePDataHeader } = await import("../src/net/pdu.ts");
    peer.write(concat(encodePDataHeader(1, true, true, junk.length), junk));
    expect((await peer.next())?.type).toBe(PduType.Abort);
    expect((await echoscu(server.port, "ALPHA")).code).toBe(0);
  });

  test("an unsupported operation on an accepted context gets status 0x0211 with an ErrorComment", async () => {
    const peer = await RawPeer.connect(server.port);
    await peer.associate("ALPHA", [VERIFICATION_CONTEXT]);
    peer.sendCommand(1, { commandField: CommandField.CStoreRQ, messageId: 7, affectedSopClassUid: "1.2.840.10008.1.1", affectedSopInstanceUid: "1.2.3", priority: 0, commandDataSetType: 0 }, new Uint8Array(10));
    const rsp = await peer.readCommand();
    expect(rsp?.commandField).toBe(CommandField.CStoreRSP);
    expect(rsp?.messageIdBeingRespondedTo).toBe(7);
    expect(rsp?.status).toBe(Status.UnrecognizedOperation);
    expect(rsp?.errorComment).toContain("C-STORE");
    peer.write(encodeReleaseRQ());
    expect((await peer.next())?.type).toBe(PduType.ReleaseRP);
  });

  test("no presentation context supported: A-ASSOCIATE-RJ", async () => {
    const peer = await RawPeer.connect(server.port);
    const pdu = await peer.associate("ALPHA", [{ id: 1, abstractSyntax: "1.2.3.4.5", transferSyntaxes: [TransferSyntax.ImplicitVRLittleEndian] }]);
    expect(pdu?.type).toBe(PduType.AssociateRJ);
    expect(decodeAssociateRJ(pdu!.body)).toEqual({ result: 1, source: 1, reason: RejectReason.NoReasonGiven });
  });

  test("ARTIM: a connection that never sends A-ASSOCIATE-RQ is closed", async () => {
    const peer = await RawPeer.connect(server.port);
    const t0 = Date.now();
    await peer.closedPromise;
    expect(Date.now() - t0).toBeLessThan(3000);
    expect(events.some((e) => e.kind === "ended" && e.reason === "artim-timeout")).toBe(true);
  });

  test("idle timeout: an idle association is aborted", async () => {
    const peer = await RawPeer.connect(server.port);
    await peer.associate("ALPHA", [VERIFICATION_CONTEXT]);
    const pdu = await peer.next(5000);
    expect(pdu?.type).toBe(PduType.Abort);
    expect(events.some((e) => e.kind === "ended" && e.reason === "idle-timeout")).toBe(true);
  });

  test("a long answer is not cut by the idle timeout, and C-CANCEL stops it with 0xFE00", async () => {
    const peer = await RawPeer.connect(server.port);
    await peer.associate("ALPHA", [{ id: 3, abstractSyntax: "1.2.840.10008.5.1.4.1.2.2.1", transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] }]);
    peer.sendCommand(3, { commandField: CommandField.CFindRQ, messageId: 9, affectedSopClassUid: "1.2.840.10008.5.1.4.1.2.2.1", priority: 0, commandDataSetType: 0 }, new Uint8Array(0));
    // The answer streams Pending for longer than the 1 s idle timeout while the peer only reads.
    const t0 = Date.now();
    let pendings = 0;
    while (Date.now() - t0 < 1800) {
      const rsp = await peer.readCommand();
      expect(rsp?.status).toBe(Status.Pending);
      pendings++;
    }
    peer.sendCommand(3, { commandField: CommandField.CCancelRQ, messageIdBeingRespondedTo: 9, commandDataSetType: NO_DATASET });
    let last;
    do last = await peer.readCommand();
    while (last?.status === Status.Pending);
    expect(pendings).toBeGreaterThan(20);
    expect(last?.status).toBe(Status.Cancel);
    expect(last?.messageIdBeingRespondedTo).toBe(9);
    peer.close();
  });
});
