/**
 * Bounded observability (issue 13): what a peer sends never grows /metrics, the audit trail or the logs
 * without bound.
 * - An unknown command field is one `service="unknown"` label value, not a time series per value.
 * - Values in audit lines and log lines are capped (1 KiB per string, marked as cut with the size and a
 *   SHA-256 prefix): a 1 MB C-FIND key no longer writes a 1 MB audit line per query.
 * - Repeated identical failures (here: TLS handshakes) are logged once per window with a count, and every
 *   one of them is still in the audit trail.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { connect } from "node:net";
import { join } from "node:path";
import { encodeCommandSet } from "../src/net/command.ts";
import { CommandField, NO_DATASET, PduType, Status, TransferSyntax } from "../src/net/constants.ts";
import { encodePDataHeader } from "../src/net/pdu.ts";
import { createAuditLog } from "../src/observe/audit.ts";
import { capValue } from "../src/shared/cap.ts";
import { createLogger } from "../src/shared/log.ts";
import { element, text } from "./helpers/dicom-build.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { getSharedOrthanc, ORTHANC_START_TIMEOUT_MS } from "./helpers/orthanc.ts";
import { Pki } from "./helpers/pki.ts";
import { concat, RawPeer } from "./helpers/raw-peer.ts";
import { until } from "./helpers/wait.ts";
import { tempDir } from "./helpers/temp.ts";

type TestGateway = Awaited<ReturnType<typeof startTestGateway>>;
let gw: TestGateway;
const logLines: string[] = [];
let pki: Pki;

const STUDY_FIND = { id: 1, abstractSyntax: "1.2.840.10008.5.1.4.1.2.2.1", transferSyntaxes: [TransferSyntax.ImplicitVRLittleEndian] };
const ECHO = { id: 3, abstractSyntax: "1.2.840.10008.1.1", transferSyntaxes: [TransferSyntax.ImplicitVRLittleEndian] };

beforeAll(async () => {
  const orthanc = await getSharedOrthanc();
  pki = new Pki();
  pki.ca();
  pki.certificate("server", "/CN=localhost", { usage: "server", san: "DNS:localhost,IP:127.0.0.1" });
  gw = await startTestGateway(
    [{ AET: "ALPHA" }, { AET: "SECURE", Tls: { Certificate: pki.file("server.crt"), Key: pki.file("server.key") } }],
    orthanc.url,
    { Gateway: { Log: { Level: "info", Format: "json" } } },
    { logger: createLogger({ level: "info", format: "json", sink: (l) => logLines.push(l) }), logRepeatWindowMs: 1500 },
  );
}, ORTHANC_START_TIMEOUT_MS);

afterAll(async () => {
  await gw?.stop();
});

function auditLines(): Record<string, unknown>[] {
  return readFileSync(gw.config.audit.file, "utf8")
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l));
}

async function metricsText(): Promise<string> {
  return (await fetch(gw.httpUrl + "/metrics")).text();
}

describe("/metrics", () => {
  test("3000 requests with 3000 different unknown command fields on one association: one service=\"unknown\" series, /metrics does not grow", async () => {
    const peer = await RawPeer.connect(gw.portOf("ALPHA"));
    expect((await peer.associate("ALPHA", [ECHO]))?.type).toBe(PduType.AssociateAC);
    // A C-ECHO first, so that every series the operations make exists before the baseline.
    peer.sendCommand(3, { commandField: CommandField.CEchoRQ, messageId: 1, affectedSopClassUid: ECHO.abstractSyntax, commandDataSetType: NO_DATASET });
    expect((await peer.readCommand())?.status).toBe(Status.Success);
    peer.sendCommand(3, { commandField: 0x0ff0, messageId: 2, affectedSopClassUid: ECHO.abstractSyntax, commandDataSetType: NO_DATASET });
    expect((await peer.readCommand())?.status).toBe(Status.UnrecognizedOperation);
    const before = (await metricsText()).length;
    const N = 3000;
    const batch: Uint8Array[] = [];
    for (let i = 0; i < N; i++) {
      // Request command fields (bit 15 clear) that no DIMSE service has.
      const c = encodeCommandSet({ commandField: 0x1000 + i, messageId: 10 + i, affectedSopClassUid: ECHO.abstractSyntax, commandDataSetType: NO_DATASET });
      batch.push(concat(encodePDataHeader(3, true, true, c.length), c));
    }
    peer.write(concat(...batch));
    for (let i = 0; i < N; i++) expect((await peer.readCommand(10_000))?.status).toBe(Status.UnrecognizedOperation);
    peer.close();
    const after = await metricsText();
    // Was 25 KB -> 5.9 MB: a counter and a histogram (18 series) per command field.
    expect(after.length - before).toBeLessThan(2048);
    expect(after).toMatch(new RegExp(`dicom_gateway_dimse_operations_total\\{tenant="ALPHA",service="unknown",status="0x0211"\\} ${N + 1}`));
    expect(after).not.toMatch(/service="0x1/);
  }, 30_000);
});

describe("audit and log values", () => {
  test("a 1 MB C-FIND key: the audit line stays a few KiB, the key cut and marked with its size", async () => {
    // 1 MB (the gateway reads identifiers of up to 1 MiB).
    const huge = "A".repeat(1_000_000);
    const identifier = concat(
      element("implicit", 0x00080052, "CS", text("STUDY")),
      element("implicit", 0x00100020, "LO", text(huge)),
      element("implicit", 0x0020000d, "UI", new Uint8Array(0)),
    );
    const peer = await RawPeer.connect(gw.portOf("ALPHA"));
    expect((await peer.associate("ALPHA", [STUDY_FIND]))?.type).toBe(PduType.AssociateAC);
    for (let q = 0; q < 3; q++) {
      peer.sendCommand(1, { commandField: CommandField.CFindRQ, messageId: 1 + q, affectedSopClassUid: STUDY_FIND.abstractSyntax, priority: 0, commandDataSetType: 0 }, identifier);
      for (;;) {
        const rsp = await peer.readCommand(20_000);
        if (rsp?.status !== Status.Pending) break;
      }
    }
    peer.close();
    await until("the C-FINDs are audited", () => auditLines().filter((l) => l.service === "C-FIND").length >= 3, 5000);
    const raw = readFileSync(gw.config.audit.file, "utf8").split("\n").filter((l) => l.includes('"C-FIND"'));
    for (const line of raw) expect(line.length).toBeLessThan(8 * 1024); // was > 1 MB each
    const finds = auditLines().filter((l) => l.service === "C-FIND");
    const kept = (finds[0]!.keys as Record<string, string>).PatientID!;
    expect(kept.startsWith("A".repeat(1024))).toBe(true);
    expect(kept).toMatch(/…\[cut: 1000000 characters, sha256 [0-9a-f]{16}\]$/);
    // Every log line is bounded too.
    for (const l of logLines) expect(l.length).toBeLessThan(16 * 1024);
  }, 60_000);

  test("the writers cap strings, lists and objects, and leave small values as they are", () => {
    const file = join(tempDir("gw-cap-"), "audit.log");
    const audit = createAuditLog({ file });
    const fields = { big: "x".repeat(5000), list: Array.from({ length: 500 }, (_, i) => `1.2.${i}`), keys: Object.fromEntries(Array.from({ length: 300 }, (_, i) => [`K${i}`, "v"])), small: "ok" };
    audit.operation({ tenant: "T", callingAe: "A", calledAe: "T", peer: "p", association: 1, service: "C-FIND", status: 0, seconds: 0, fields });
    audit.close();
    const line = readFileSync(file, "utf8");
    expect(line.length).toBeLessThan(8 * 1024);
    const rec = JSON.parse(line);
    expect(rec.small).toBe("ok");
    expect(rec.big).toMatch(/^x{1024}…\[cut: 5000 characters, sha256 [0-9a-f]{16}\]$/);
    expect(rec.list).toHaveLength(101);
    expect(rec.list[100]).toBe("…[cut: 400 more elements]");
    expect(Object.keys(rec.keys)).toHaveLength(101);
    expect(rec.keys["…cut"]).toBe("200 more keys");
    const out: string[] = [];
    createLogger({ format: "json", sink: (l) => out.push(l) }).warn("x", { value: "y".repeat(1 << 20), error: new Error("z".repeat(4096)) });
    expect(out[0]!.length).toBeLessThan(4096);
    expect(JSON.parse(out[0]!).error.message).toMatch(/cut: 4096 characters/);
    const same = { a: "short", b: [1, 2, 3] };
    expect(capValue(same)).toBe(same);
  });
});

describe("repeated failures", () => {
  test("50 identical TLS handshake failures: one log line, then one with the count; 50 audit lines", async () => {
    const port = gw.portOf("SECURE");
    const auditBefore = auditLines().filter((l) => l.reason === "tls-handshake-failed").length;
    const logBefore = logLines.length;
    // Plain DICOM on the TLS port: the same failure (a TLS record of a wrong version) each time.
    for (let i = 0; i < 50; i++) {
      await new Promise<void>((resolve) => {
        const s = connect({ port, host: "127.0.0.1" }, () => s.write(Uint8Array.of(0x01, 0x00, 0x00, 0x00, 0x00, 0xcc, 0x00, 0x01)));
        s.on("error", () => {});
        s.resume();
        s.on("close", () => resolve());
      });
    }
    await until("every failure is audited", () => auditLines().filter((l) => l.reason === "tls-handshake-failed").length >= auditBefore + 50, 10_000);
    await until("the count is logged", () => logLines.slice(logBefore).some((l) => l.includes("TLS handshake failed (repeated)")), 5000);
    const lines = logLines.slice(logBefore).filter((l) => l.includes("TLS handshake failed")).map((l) => JSON.parse(l));
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatchObject({ msg: "TLS handshake failed", tenant: "SECURE", reason: "tls-handshake-failed" });
    expect(lines[1]).toMatchObject({ msg: "TLS handshake failed (repeated)", tenant: "SECURE", repeated: 49 });
    expect(auditLines().filter((l) => l.reason === "tls-handshake-failed").length).toBe(auditBefore + 50);
    expect(await metricsText()).toMatch(/dicom_gateway_associations_total\{tenant="SECURE",result="rejected",reason="tls-handshake-failed"\} (5\d|[6-9]\d)/);
  }, 30_000);
});
