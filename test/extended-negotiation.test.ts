/** SOP Class Extended Negotiation for C-FIND (PS3.7 D.3.3.5, PS3.4 C.3.1): combined date-time matching is offered. */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { DICOM_APPLICATION_CONTEXT, ItemType, PduType, TransferSyntax } from "../src/net/constants.ts";
import { encodeExtendedNegotiation } from "../src/net/negotiation.ts";
import { decodeAssociateAC, encodeAssociateRQ } from "../src/net/pdu.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { RawPeer } from "./helpers/raw-peer.ts";

const STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1";
let gw: Awaited<ReturnType<typeof startTestGateway>>;

beforeAll(async () => {
  gw = await startTestGateway([{ AET: "EXT", Labels: ["e"] }], "http://127.0.0.1:1");
});
afterAll(async () => {
  await gw?.stop();
});

async function negotiate(info: number[], sopClassUid = STUDY_ROOT_FIND): Promise<{ type: number; data: Uint8Array }[]> {
  const peer = await RawPeer.connect(gw.portOf("EXT"));
  peer.write(
    encodeAssociateRQ({
      protocolVersion: 1,
      calledAeTitle: "EXT",
      callingAeTitle: "RAWPEER",
      applicationContext: DICOM_APPLICATION_CONTEXT,
      presentationContexts: [{ id: 1, abstractSyntax: STUDY_ROOT_FIND, transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] }],
      userInformation: { maxPduLength: 16384, implementationClassUid: "1.2.3.4", roleSelections: [], otherItems: [encodeExtendedNegotiation({ sopClassUid, info: Uint8Array.from(info) })] },
    }),
  );
  const pdu = await peer.next();
  peer.close();
  expect(pdu?.type).toBe(PduType.AssociateAC);
  return decodeAssociateAC(pdu!.body).userInformation.otherItems.filter((i) => i.type === ItemType.SopClassExtendedNegotiation);
}

test("combined date-time matching is accepted, relational queries, fuzzy names and timezone adjustment are not", async () => {
  const [answer] = await negotiate([1, 1, 1, 1]);
  const expected = encodeExtendedNegotiation({ sopClassUid: STUDY_ROOT_FIND, info: Uint8Array.of(0, 1) });
  expect([...answer!.data]).toEqual([...expected.data]);
  const [none] = await negotiate([1, 0]);
  expect([...none!.data].slice(-2)).toEqual([0, 0]);
});

test("an extended negotiation item for a SOP class the tenant does not offer gets no answer", async () => {
  expect(await negotiate([0, 1], "1.2.3.4.5.6")).toEqual([]);
});
