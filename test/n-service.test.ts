/**
 * DIMSE-N plumbing for Storage Commitment (PS3.7 10.1, 10.3.1, 10.3.4; PS3.4 Annex J), with no
 * service behind it: the acceptor dispatches N-ACTION-RQ to a handler and sends an N-EVENT-REPORT-RQ
 * on the same association (the SCP sending to the SCU, PS3.4 J.3.3), during the operation or after
 * its final response; the requestor sends N-EVENT-REPORT-RQ on a new association (SCP role proposed,
 * PS3.7 D.3.3.4) and serves one as the SCU. Against the project's own peers, and against dcmjs-dimse
 * both ways (dcmtk has no Storage Commitment tool).
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { AssociationObserver, DimseHandler, DimseResponder } from "../src/net/association.ts";
import type { CommandSet } from "../src/net/command.ts";
import { CommandField, Status, TransferSyntax } from "../src/net/constants.ts";
import type { DimseResult } from "../src/net/dimse.ts";
import { nActionRQ, nEventReportRQ } from "../src/net/n-service.ts";
import { RequestorAssociation } from "../src/net/requestor.ts";
import type { DimseServer } from "../src/net/server.ts";
import { startBareServer } from "./helpers/bare-server.ts";
import { freePort } from "./helpers/ports.ts";
import { until } from "./helpers/wait.ts";

const STORAGE_COMMITMENT = "1.2.840.10008.1.20.1";
/** The well-known SOP instance of the Storage Commitment Push Model (PS3.4 J.3.1). */
const STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1";
const CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2";
/** Action Type ID 1: request storage commitment (PS3.4 J.3.2.1); Event Type ID 1: succeeded (J.3.3.1). */
const REQUEST_COMMITMENT = 1;
const COMMITMENT_SUCCEEDED = 1;

const latin1 = new TextDecoder("latin1");

/**
 * The core of Storage Commitment's action and event information (PS3.4 tables J.3-1, J.3-2):
 * Transaction UID (0008,1195) and a Referenced SOP Sequence (0008,1199) of one instance, in Implicit
 * or Explicit VR Little Endian.
 */
function commitmentInfo(transactionUid: string, sopInstanceUid: string, explicit: boolean): Uint8Array {
  const ui = (v: string) => new TextEncoder().encode(v.length % 2 ? v + "\0" : v);
  const element = (group: number, el: number, vr: string, value: Uint8Array): Uint8Array => {
    const long = vr === "SQ";
    const head = new Uint8Array(explicit ? (long ? 12 : 8) : 8);
    const dv = new DataView(head.buffer);
    dv.setUint16(0, group, true);
    dv.setUint16(2, el, true);
    if (!explicit) dv.setUint32(4, value.length, true);
    else {
      head[4] = vr.charCodeAt(0);
      head[5] = vr.charCodeAt(1);
      if (long) dv.setUint32(8, value.length, true);
      else dv.setUint16(6, value.length, true);
    }
    return Uint8Array.from([...head, ...value]);
  };
  const itemBody = Uint8Array.from([...element(0x0008, 0x1150, "UI", ui(CT_IMAGE_STORAGE)), ...element(0x0008, 0x1155, "UI", ui(sopInstanceUid))]);
  const item = new Uint8Array(8 + itemBody.length);
  const dv = new DataView(item.buffer);
  dv.setUint16(0, 0xfffe, true);
  dv.setUint16(2, 0xe000, true);
  dv.setUint32(4, itemBody.length, true);
  item.set(itemBody, 8);
  return Uint8Array.from([...element(0x0008, 0x1195, "UI", ui(transactionUid)), ...element(0x0008, 0x1199, "SQ", item)]);
}

const explicitFor = (transferSyntax: string) => transferSyntax !== TransferSyntax.ImplicitVRLittleEndian;

const report = nEventReportRQ({ affectedSopClassUid: STORAGE_COMMITMENT, affectedSopInstanceUid: STORAGE_COMMITMENT_INSTANCE, eventTypeId: COMMITMENT_SUCCEEDED });
const action = nActionRQ({ requestedSopClassUid: STORAGE_COMMITMENT, requestedSopInstanceUid: STORAGE_COMMITMENT_INSTANCE, actionTypeId: REQUEST_COMMITMENT });

/** What the acceptor side saw: the N-ACTION-RQ, its information, and the response to its own N-EVENT-REPORT-RQ. */
interface Seen {
  action?: CommandSet;
  actionInfo?: Uint8Array;
  reportResponse?: DimseResult;
  reportFailed?: string;
  responder?: DimseResponder;
  operations: { service: string; status: number }[];
}
let seen: Seen = { operations: [] };
/** How the acceptor sends its N-EVENT-REPORT-RQ: from the handler before it returns, or after it returned. */
let reportMode: "in-handler" | "after" = "in-handler";

/** Answers N-ACTION, then reports on the same association: the Storage Commitment exchange without a service. */
const commit: DimseHandler = async (req, res) => {
  seen.action = req.command;
  seen.actionInfo = await req.dataset?.readAll(1 << 16);
  seen.responder = res;
  await res.respond({ status: Status.Success });
  const info = commitmentInfo("1.2.826.0.1.3680043.2.1143.77", "1.2.3.4.5", explicitFor(req.presentationContext.transferSyntax));
  const sending = res.request(req.presentationContext.id, report, info).then(
    (r) => void (seen.reportResponse = r),
    (e: Error) => void (seen.reportFailed = e.message),
  );
  if (reportMode === "in-handler") await sending;
};

let server: DimseServer;

beforeAll(async () => {
  const observer: AssociationObserver = { operation: (_info, service, status) => seen.operations.push({ service, status }) };
  server = await startBareServer({
    abstractSyntaxes: [STORAGE_COMMITMENT],
    acceptScpRoleFor: (uid) => uid === STORAGE_COMMITMENT,
    handlers: new Map([
      [CommandField.NActionRQ, commit],
      [CommandField.NEventReportRQ, async (req, res) => res.respond({ status: req.command.eventTypeId === COMMITMENT_SUCCEEDED ? Status.Success : Status.NoSuchEventType })],
    ]),
    observer,
  });
});

afterAll(async () => {
  await server?.close();
});

const commitmentContext = { abstractSyntax: STORAGE_COMMITMENT, transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian, TransferSyntax.ImplicitVRLittleEndian] };

describe("with the project's own peers", () => {
  for (const mode of ["in-handler", "after"] as const) {
    test(`N-ACTION-RQ is dispatched to its handler; the acceptor then sends N-EVENT-REPORT-RQ on the same association (${mode === "in-handler" ? "awaited by the handler" : "after the operation ended"}) and gets its response`, async () => {
      seen = { operations: [] };
      reportMode = mode;
      const reports: { command: CommandSet; info?: Uint8Array }[] = [];
      const a = await RequestorAssociation.connect({
        host: "127.0.0.1",
        port: server.port,
        calledAeTitle: "COMMIT",
        callingAeTitle: "MODALITY",
        presentationContexts: [commitmentContext],
        onRequest: async (req) => {
          reports.push({ command: req.command, info: await req.dataset?.readAll(1 << 16) });
          return { status: Status.Success };
        },
      });
      const pc = a.findContext(STORAGE_COMMITMENT)!;
      const actionInfo = commitmentInfo("1.2.826.0.1.3680043.2.1143.77", "1.2.3.4.5", explicitFor(pc.transferSyntax));
      const rsp = await a.requestWithDataset(pc.id, action, actionInfo);
      // N-ACTION-RSP (PS3.7 10.3.4): Affected SOP Class/Instance UID and Action Type ID from the request.
      expect(rsp.command).toMatchObject({
        commandField: CommandField.NActionRSP,
        affectedSopClassUid: STORAGE_COMMITMENT,
        affectedSopInstanceUid: STORAGE_COMMITMENT_INSTANCE,
        actionTypeId: REQUEST_COMMITMENT,
        status: Status.Success,
      });
      expect(rsp.dataset).toBeUndefined();
      expect(seen.action).toMatchObject({ commandField: CommandField.NActionRQ, requestedSopClassUid: STORAGE_COMMITMENT, requestedSopInstanceUid: STORAGE_COMMITMENT_INSTANCE, actionTypeId: REQUEST_COMMITMENT });
      expect(Buffer.compare(seen.actionInfo!, actionInfo)).toBe(0);
      await until("the acceptor has the N-EVENT-REPORT-RSP", () => seen.reportResponse !== undefined || seen.reportFailed !== undefined, 5000, 10);
      expect(seen.reportFailed).toBeUndefined();
      // The SCU received the report with its event information...
      expect(reports.length).toBe(1);
      expect(reports[0]!.command).toMatchObject({ commandField: CommandField.NEventReportRQ, affectedSopClassUid: STORAGE_COMMITMENT, affectedSopInstanceUid: STORAGE_COMMITMENT_INSTANCE, eventTypeId: COMMITMENT_SUCCEEDED });
      expect(latin1.decode(reports[0]!.info!)).toContain("1.2.826.0.1.3680043.2.1143.77");
      // ...and the SCP its N-EVENT-REPORT-RSP (PS3.7 10.3.1), answering its own Message ID.
      expect(seen.reportResponse!.command).toMatchObject({
        commandField: CommandField.NEventReportRSP,
        messageIdBeingRespondedTo: reports[0]!.command.messageId,
        affectedSopClassUid: STORAGE_COMMITMENT,
        affectedSopInstanceUid: STORAGE_COMMITMENT_INSTANCE,
        eventTypeId: COMMITMENT_SUCCEEDED,
        status: Status.Success,
      });
      expect(seen.operations).toEqual([{ service: "N-ACTION", status: Status.Success }]);
      await a.release();
      // Once the association is released, a further report must go on a new association.
      await expect(seen.responder!.request(pc.id, report)).rejects.toThrow(/cannot send a request: association ended/);
    });
  }

  test("the requestor as the Storage Commitment SCP on a new association: SCP role proposed, N-EVENT-REPORT-RQ sent, its response received", async () => {
    const a = await RequestorAssociation.connect({
      host: "127.0.0.1",
      port: server.port,
      calledAeTitle: "MODALITY",
      callingAeTitle: "COMMIT",
      presentationContexts: [commitmentContext],
      roleSelections: [{ sopClassUid: STORAGE_COMMITMENT, scu: false, scp: true }],
    });
    expect(a.roleSelections).toEqual([{ sopClassUid: STORAGE_COMMITMENT, scu: false, scp: true }]);
    const pc = a.findContext(STORAGE_COMMITMENT)!;
    const rsp = await a.requestWithDataset(pc.id, report, commitmentInfo("1.2.3.99", "1.2.3.4.5", explicitFor(pc.transferSyntax)));
    expect(rsp.command).toMatchObject({ commandField: CommandField.NEventReportRSP, eventTypeId: COMMITMENT_SUCCEEDED, affectedSopInstanceUid: STORAGE_COMMITMENT_INSTANCE, status: Status.Success });
    // An event type the SCU does not know is its handler's to refuse (PS3.7 C.5: No Such Event Type).
    const unknown = await a.request(pc.id, nEventReportRQ({ affectedSopClassUid: STORAGE_COMMITMENT, affectedSopInstanceUid: STORAGE_COMMITMENT_INSTANCE, eventTypeId: 9 }));
    expect(unknown).toMatchObject({ status: Status.NoSuchEventType, eventTypeId: 9 });
    await a.release();
  });

  test("an N-service without a handler is answered 0x0211 (unrecognized operation) with an ErrorComment", async () => {
    const a = await RequestorAssociation.connect({ host: "127.0.0.1", port: server.port, calledAeTitle: "X", callingAeTitle: "Y", presentationContexts: [commitmentContext] });
    const pc = a.findContext(STORAGE_COMMITMENT)!;
    const rsp = await a.request(pc.id, { commandField: CommandField.NGetRQ, requestedSopClassUid: STORAGE_COMMITMENT, requestedSopInstanceUid: STORAGE_COMMITMENT_INSTANCE });
    expect(rsp.commandField).toBe(CommandField.NGetRSP);
    expect(rsp.status).toBe(Status.UnrecognizedOperation);
    expect(rsp.errorComment).toBe("N-GET is not supported by this AE");
    expect(rsp.errorComment!.length).toBeLessThanOrEqual(64);
    await a.release();
  });
});

describe("with dcmjs-dimse as the other side", () => {
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  let dimse: any;
  beforeAll(async () => {
    const m = (await import("dcmjs-dimse")) as { default?: unknown };
    dimse = m.default ?? m;
    dimse.log.setLevel("error");
  });

  test("dcmjs-dimse sends N-ACTION-RQ; the gateway's acceptor answers and reports on the same association; dcmjs-dimse answers the report", async () => {
    seen = { operations: [] };
    reportMode = "after";
    const { Client, Dataset, requests, responses, constants } = dimse;
    const events: { eventTypeId: number; instance: string; transactionUid?: string }[] = [];
    const actionStatus = await new Promise<number>((resolve, reject) => {
      const client = new Client();
      const request = new requests.NActionRequest(STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, REQUEST_COMMITMENT);
      request.setDataset(new Dataset({ TransactionUID: "1.2.826.0.1.3680043.2.1143.78", ReferencedSOPSequence: [{ ReferencedSOPClassUID: CT_IMAGE_STORAGE, ReferencedSOPInstanceUID: "1.2.3.4.6" }] }));
      let status: number | undefined;
      request.on("response", (response: { getStatus(): number }) => (status = response.getStatus()));
      client.on("nEventReportRequest", (rq: { getEventTypeId(): number; getAffectedSopInstanceUid(): string; getDataset(): { getElement(k: string): string } | undefined }, callback: (r: unknown) => void) => {
        events.push({ eventTypeId: rq.getEventTypeId(), instance: rq.getAffectedSopInstanceUid(), transactionUid: rq.getDataset()?.getElement("TransactionUID") });
        const rsp = responses.NEventReportResponse.fromRequest(rq);
        rsp.setStatus(constants.Status.Success);
        callback(rsp);
      });
      client.on("networkError", (e: Error) => reject(e));
      client.on("closed", () => (status === undefined ? reject(new Error("no N-ACTION-RSP")) : resolve(status)));
      client.addRequest(request);
      // Lingers after its last response, so that the report on the same association reaches it.
      client.send("127.0.0.1", server.port, "DCMJS", "COMMIT", { associationLingerTimeout: 2000 });
    });
    expect(actionStatus).toBe(Status.Success);
    expect(latin1.decode(seen.actionInfo!)).toContain("1.2.826.0.1.3680043.2.1143.78");
    expect(events).toEqual([{ eventTypeId: COMMITMENT_SUCCEEDED, instance: STORAGE_COMMITMENT_INSTANCE, transactionUid: "1.2.826.0.1.3680043.2.1143.77" }]);
    expect(seen.reportFailed).toBeUndefined();
    expect(seen.reportResponse!.command).toMatchObject({ commandField: CommandField.NEventReportRSP, status: Status.Success });
  });

  test("the gateway's requestor sends N-EVENT-REPORT-RQ to a dcmjs-dimse SCP and gets its response", async () => {
    const { Server, Scp, responses, constants } = dimse;
    const received: { eventTypeId: number; transactionUid?: string }[] = [];
    class CommitmentScu extends Scp {
      // eslint-disable-next-line @typescript-eslint/no-explicit-any
      associationRequested(association: any) {
        for (const c of association.getPresentationContexts()) {
          const context = association.getPresentationContext(c.id);
          if (context.getAbstractSyntaxUid() === STORAGE_COMMITMENT) context.setResult(constants.PresentationContextResult.Accept, constants.TransferSyntax.ImplicitVRLittleEndian);
          else context.setResult(constants.PresentationContextResult.RejectAbstractSyntaxNotSupported);
        }
        this.sendAssociationAccept();
      }
      // eslint-disable-next-line @typescript-eslint/no-explicit-any
      nEventReportRequest(request: any, callback: (r: unknown) => void) {
        received.push({ eventTypeId: request.getEventTypeId(), transactionUid: request.getDataset()?.getElement("TransactionUID") });
        const rsp = responses.NEventReportResponse.fromRequest(request);
        rsp.setStatus(constants.Status.Success);
        callback(rsp);
      }
      associationReleaseRequested() {
        this.sendAssociationReleaseResponse();
      }
    }
    const port = await freePort();
    const scp = new Server(CommitmentScu);
    scp.on("networkError", () => {});
    scp.listen(port);
    try {
      const connect = () =>
        RequestorAssociation.connect({
          host: "127.0.0.1",
          port,
          calledAeTitle: "MODALITY",
          callingAeTitle: "COMMIT",
          presentationContexts: [{ abstractSyntax: STORAGE_COMMITMENT, transferSyntaxes: [TransferSyntax.ImplicitVRLittleEndian] }],
          roleSelections: [{ sopClassUid: STORAGE_COMMITMENT, scu: false, scp: true }],
          connectTimeoutMs: 3000,
        });
      // The server listens once its event loop turn has run: retry a refused connection for a moment.
      let a: RequestorAssociation | undefined;
      await until("the dcmjs-dimse SCP accepts", async () => (a = await connect().catch(() => undefined)) !== undefined, 5000, 50);
      const pc = a!.findContext(STORAGE_COMMITMENT)!;
      const rsp = await a!.request(pc.id, report, commitmentInfo("1.2.3.100", "1.2.3.4.7", false));
      expect(rsp).toMatchObject({ commandField: CommandField.NEventReportRSP, status: Status.Success, eventTypeId: COMMITMENT_SUCCEEDED });
      expect(received).toEqual([{ eventTypeId: COMMITMENT_SUCCEEDED, transactionUid: "1.2.3.100" }]);
      await a!.release();
    } finally {
      scp.close();
    }
  });
});
