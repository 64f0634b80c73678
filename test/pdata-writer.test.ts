/**
 * PDataWriter over a real loopback TCP connection: held messages (C-FIND Pending responses) go out in
 * the same socket write as the next message, in order, and never wait behind a streamed data set or
 * grow past the small-message bound.
 */
import { afterEach, beforeEach, expect, test } from "bun:test";
import { createServer, connect, type Server, type Socket } from "node:net";
import { concatBytes } from "../src/shared/bytes.ts";
import { decodeCommandSet, type CommandSet } from "../src/net/command.ts";
import { PduType, Status } from "../src/net/constants.ts";
import { PDataWriter } from "../src/net/pdata-writer.ts";
import { decodePData } from "../src/net/pdu.ts";
import { PduReader } from "../src/net/pdu-reader.ts";

let server: Server;
let client: Socket;
let received: Uint8Array[];
let writes: number[];
let peerGot: (bytes: number) => Promise<void>;

beforeEach(async () => {
  received = [];
  writes = [];
  let total = 0;
  const waiters: Array<{ n: number; resolve: () => void }> = [];
  server = createServer((s) => {
    s.on("data", (d: Uint8Array) => {
      received.push(new Uint8Array(d));
      total += d.length;
      for (const w of waiters.splice(0)) {
        if (total >= w.n) w.resolve();
        else waiters.push(w);
      }
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  client = connect({ host: "127.0.0.1", port: (server.address() as { port: number }).port });
  await new Promise((r) => client.once("connect", r));
  // Every write the writer makes, counted where it reaches the socket.
  const write = client.write.bind(client) as (b: Uint8Array) => boolean;
  (client as unknown as { write: (b: Uint8Array) => boolean }).write = (b: Uint8Array) => {
    writes.push(b.length);
    return write(b);
  };
  peerGot = (n) => (total >= n ? Promise.resolve() : new Promise((resolve) => waiters.push({ n, resolve })));
});

afterEach(() => {
  client.destroy();
  server.close();
});

/** The messages the peer received: each command set, and the data set bytes that followed it. */
function messages(): Array<{ command: CommandSet; dataset: number }> {
  const reader = new PduReader({ maxPDataLength: 1 << 24, maxControlLength: 1 << 16 });
  const out: Array<{ command: CommandSet; dataset: number }> = [];
  let command: Uint8Array[] = [];
  for (const chunk of received) {
    for (const pdu of reader.push(chunk)) {
      expect(pdu.type).toBe(PduType.PData);
      for (const pdv of decodePData(pdu.body)) {
        if (pdv.isCommand) {
          command.push(pdv.data);
          if (pdv.isLast) {
            out.push({ command: decodeCommandSet(concatBytes(command)), dataset: 0 });
            command = [];
          }
        } else out[out.length - 1]!.dataset += pdv.data.length;
      }
    }
  }
  return out;
}

const response = (n: number, status: number): CommandSet => ({ commandField: 0x8020, messageIdBeingRespondedTo: n, affectedSopClassUid: "1.2.840.10008.5.1.4.1.2.2.1", commandDataSetType: status === Status.Pending ? 0 : 0x0101, status });

test("held Pending responses and the final response leave in one socket write, in order", async () => {
  const w = new PDataWriter(client, 16384);
  const identifier = new Uint8Array(300).fill(0x41);
  await w.send(1, response(1, Status.Pending), identifier, true);
  await w.send(1, response(2, Status.Pending), identifier, true);
  await w.send(1, response(3, Status.Pending), identifier, true);
  expect(writes).toEqual([]);
  await w.send(1, response(4, Status.Success));
  expect(writes.length).toBe(1);
  await peerGot(writes[0]!);
  const got = messages();
  expect(got.map((m) => m.command.messageIdBeingRespondedTo)).toEqual([1, 2, 3, 4]);
  expect(got.map((m) => m.command.status)).toEqual([Status.Pending, Status.Pending, Status.Pending, Status.Success]);
  expect(got.map((m) => m.dataset)).toEqual([300, 300, 300, 0]);
});

test("a streamed data set after held messages: the held ones are written first", async () => {
  const w = new PDataWriter(client, 16384);
  await w.send(1, response(1, Status.Pending), new Uint8Array(100), true);
  async function* chunks() {
    for (let i = 0; i < 4; i++) yield new Uint8Array(100_000).fill(i);
  }
  await w.send(3, { commandField: 0x0001, messageId: 9, affectedSopClassUid: "1.2.840.10008.5.1.4.1.1.2", affectedSopInstanceUid: "1.2.3", priority: 0, commandDataSetType: 0 }, chunks());
  const total = writes.reduce((n, b) => n + b, 0);
  await peerGot(total);
  const got = messages();
  expect(got.map((m) => m.command.messageIdBeingRespondedTo ?? m.command.messageId)).toEqual([1, 9]);
  expect(got.map((m) => m.dataset)).toEqual([100, 400_000]);
});

test("held bytes never grow past the small-message bound: a full hold is written at once", async () => {
  const w = new PDataWriter(client, 16384);
  const identifier = new Uint8Array(60_000);
  for (let i = 1; i <= 10; i++) await w.send(1, response(i, Status.Pending), identifier, true);
  // 256 KiB hold at most: some of the ten (600 kB) went out before any final response.
  expect(writes.length).toBeGreaterThan(0);
  expect(Math.max(...writes)).toBeLessThanOrEqual(256 * 1024 + 60_200);
  await w.send(1, response(11, Status.Success));
  await peerGot(writes.reduce((n, b) => n + b, 0));
  expect(messages().map((m) => m.command.messageIdBeingRespondedTo)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
});

/** The PDUs the peer received: for each, its length field and its PDV items (command?, last?, bytes). */
function pdus(): Array<{ length: number; pdvs: Array<{ isCommand: boolean; isLast: boolean; bytes: number }> }> {
  const reader = new PduReader({ maxPDataLength: 1 << 24, maxControlLength: 1 << 16 });
  const out: Array<{ length: number; pdvs: Array<{ isCommand: boolean; isLast: boolean; bytes: number }> }> = [];
  for (const chunk of received) {
    for (const pdu of reader.push(chunk)) out.push({ length: pdu.body.length, pdvs: decodePData(pdu.body).map((p) => ({ isCommand: p.isCommand, isLast: p.isLast, bytes: p.data.length })) });
  }
  return out;
}

test("a response and its small identifier travel as one P-DATA-TF PDU of two PDV items (PS3.8 9.3.5.1)", async () => {
  const w = new PDataWriter(client, 16384);
  await w.send(1, { ...response(1, 0xb000), commandDataSetType: 0 }, new Uint8Array(1000).fill(0x31));
  await peerGot(writes.reduce((n, b) => n + b, 0));
  const got = pdus();
  expect(got.length).toBe(1);
  expect(got[0]!.pdvs.map((p) => [p.isCommand, p.isLast])).toEqual([
    [true, true],
    [false, true],
  ]);
  expect(got[0]!.pdvs[1]!.bytes).toBe(1000);
  expect(messages().map((m) => m.dataset)).toEqual([1000]);
});

test("an in-memory message larger than the peer's maximum: PDUs packed up to the maximum, never beyond", async () => {
  const max = 4096;
  const w = new PDataWriter(client, max);
  await w.send(1, { ...response(1, Status.Pending), commandDataSetType: 0 }, new Uint8Array(10_000).fill(0x32));
  await peerGot(writes.reduce((n, b) => n + b, 0));
  const got = pdus();
  // The PDU's variable field (its PDV items) is what Maximum Length Receive bounds (PS3.8 D.1.1).
  expect(got.every((p) => p.length <= max)).toBe(true);
  // The command shares the first PDU with the first data fragment; the rest are full fragments.
  expect(got[0]!.pdvs.map((p) => p.isCommand)).toEqual([true, false]);
  expect(got.flatMap((p) => p.pdvs).filter((p) => !p.isCommand).reduce((n, p) => n + p.bytes, 0)).toBe(10_000);
  expect(got.flatMap((p) => p.pdvs).filter((p) => p.isLast).length).toBe(2);
  expect(got.length).toBe(3);
  expect(messages().map((m) => m.dataset)).toEqual([10_000]);
});
