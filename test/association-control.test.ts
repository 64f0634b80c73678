/**
 * Association control per tenant: AllowedCallers (AE titles, bound to a host, IP address or CIDR),
 * MaxAssociations per tenant and Gateway.Limits.MaxAssociations in total, and the ARTIM timeout from
 * Gateway.Limits.ArtimTimeoutSeconds. Refusals are checked both as bytes (A-ASSOCIATE-RJ
 * result/source/reason, PS3.8 9.3.4) and as dcmtk's echoscu prints them.
 *
 * C-ECHO needs no Orthanc: the gateway runs against an address where nothing listens.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { AbortReason, AbortSource, PduType } from "../src/net/constants.ts";
import { describeRejection, rejectReasonLabel, RejectReason, RejectResult, RejectSource } from "../src/net/reject.ts";
import { decodeAbort, decodeAssociateRJ } from "../src/net/pdu.ts";
import type { Peer } from "../src/net/association.ts";
import { createAssociationPolicy } from "../src/tenancy/association-policy.ts";
import { inRange, parseAddress, parseAddressRange, parseCallerHost } from "../src/shared/address.ts";
import { encodeAssociateRQ } from "../src/net/pdu.ts";
import { DICOM_APPLICATION_CONTEXT } from "../src/net/constants.ts";
import { echoscu } from "./helpers/dcmtk.ts";
import { gatewayTracker, type TestGateway } from "./helpers/gateway.ts";
import { freePort } from "./helpers/ports.ts";
import { RawPeer, VERIFICATION_CONTEXT } from "./helpers/raw-peer.ts";
import { until } from "./helpers/wait.ts";

let NO_ORTHANC: string;
const gateways = gatewayTracker();
const gateway = gateways.start;

beforeAll(async () => {
  NO_ORTHANC = `http://127.0.0.1:${await freePort()}`;
});

afterAll(async () => {
  await gateways.stopAll();
});

async function metricsText(gw: TestGateway): Promise<string> {
  return (await fetch(gw.httpUrl + "/metrics")).text();
}

/** An A-ASSOCIATE-RQ with a chosen calling AE title (RawPeer.associate always calls as RAWPEER). */
function rq(calledAe: string, callingAe: string): Uint8Array {
  return encodeAssociateRQ({
    protocolVersion: 1,
    calledAeTitle: calledAe,
    callingAeTitle: callingAe,
    applicationContext: DICOM_APPLICATION_CONTEXT,
    presentationContexts: [VERIFICATION_CONTEXT],
    userInformation: { maxPduLength: 16384, implementationClassUid: "1.2.3.4", roleSelections: [], otherItems: [] },
  });
}

describe("the A-ASSOCIATE-RJ reason table (PS3.8 9.3.4)", () => {
  test("every reason the gateway sends has its metric label and its words; values PS3.8 reserves are labeled as such", () => {
    const { ServiceUser, ServiceProviderAcse, ServiceProviderPresentation } = RejectSource;
    expect([
      rejectReasonLabel(ServiceUser, RejectReason.NoReasonGiven),
      rejectReasonLabel(ServiceUser, RejectReason.ApplicationContextNameNotSupported),
      rejectReasonLabel(ServiceUser, RejectReason.CallingAeTitleNotRecognized),
      rejectReasonLabel(ServiceUser, RejectReason.CalledAeTitleNotRecognized),
      rejectReasonLabel(ServiceProviderAcse, RejectReason.ProtocolVersionNotSupported),
      rejectReasonLabel(ServiceProviderPresentation, RejectReason.TemporaryCongestion),
      rejectReasonLabel(ServiceProviderPresentation, RejectReason.LocalLimitExceeded),
    ]).toEqual([
      "no-reason-given",
      "application-context-not-supported",
      "calling-ae-title-not-recognized",
      "called-ae-title-not-recognized",
      "protocol-version-not-supported",
      "temporary-congestion",
      "local-limit-exceeded",
    ]);
    // The same value means different things from different sources.
    expect(rejectReasonLabel(ServiceProviderAcse, 1)).toBe("no-reason-given");
    expect(rejectReasonLabel(ServiceUser, 5)).toBe("reserved");
    expect(describeRejection(RejectResult.Transient, ServiceProviderPresentation, RejectReason.LocalLimitExceeded)).toBe("transient, service provider (presentation): local limit exceeded");
    expect(describeRejection(RejectResult.Permanent, ServiceProviderAcse, RejectReason.ProtocolVersionNotSupported)).toBe("permanent, service provider (ACSE): protocol version not supported");
    expect(describeRejection(RejectResult.Permanent, ServiceUser, 9)).toBe("permanent, service user: reason 9");
  });
});

describe("addresses", () => {
  const cases: [string, string, boolean][] = [
    ["127.0.0.1", "127.0.0.1", true],
    ["127.0.0.1", "127.0.0.2", false],
    ["::ffff:127.0.0.1", "127.0.0.0/8", true],
    ["::ffff:127.0.0.1", "127.0.0.1", true],
    ["127.0.0.1", "::ffff:127.0.0.1", true],
    ["10.1.2.3", "::ffff:10.0.0.0/104", true],
    ["10.1.2.3", "10.0.0.0/8", true],
    ["11.1.2.3", "10.0.0.0/8", false],
    ["192.168.1.129", "192.168.1.128/25", true],
    ["192.168.1.127", "192.168.1.128/25", false],
    ["1.2.3.4", "0.0.0.0/0", true],
    ["::1", "::1", true],
    ["::1", "127.0.0.1", false],
    ["127.0.0.1", "::/0", false],
    ["2001:db8::5", "2001:db8::/32", true],
    ["2001:db9::5", "2001:db8::/32", false],
    ["fe80::1%eth0", "fe80::/10", true],
    ["[2001:db8::1]", "2001:db8:0:0:0:0:0:1", true],
  ];
  for (const [address, range, expected] of cases) {
    test(`${address} ${expected ? "is" : "is not"} in ${range}`, () => {
      expect(inRange(parseAddress(address)!, parseAddressRange(range)!)).toBe(expected);
    });
  }

  test("host names and nonsense are not address ranges", () => {
    for (const s of ["pacs.example.org", "localhost", "10.0.0.0/33", "10.0.0.0/x", "::1/129", "1.2.3"]) expect(parseAddressRange(s)).toBeUndefined();
    expect(parseAddress("not-an-address")).toBeUndefined();
  });

  test("one grammar with the configuration: what config/ refuses as a Host is no range here either", () => {
    // Brackets and zones are for peers as sockets report them, never for a configured Host; no leading zeros;
    // a dotted quad only ends an IPv6 address.
    for (const s of ["[::1]", "fe80::1%eth0", "10.0.0.0/08", "010.0.0.1", "1.2.3.4::", "::1.2.3.4:5", "10.0.0.0/8/8", "10.0.0.0/ 8"]) {
      expect(parseAddressRange(s)).toBeUndefined();
      expect(parseCallerHost(s)).toBeUndefined();
    }
    expect(parseCallerHost(" Modality.Example.ORG ")).toEqual({ hostName: "modality.example.org" });
    expect(parseCallerHost("10.0.0.5/24")).toEqual({ range: { address: Uint8Array.of(10, 0, 0, 5), prefix: 24 } });
    expect(parseCallerHost("::ffff:0:0/96")).toEqual({ range: { address: Uint8Array.of(0, 0, 0, 0), prefix: 0 } });
    expect(parseAddressRange("1:2:3:4:5:6:1.2.3.4")?.address).toEqual(Uint8Array.of(0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 1, 2, 3, 4));
    expect(parseAddressRange("2001:db8::7:8")?.address).toEqual(Uint8Array.of(0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 8));
  });
});

describe("AllowedCallers policy (unit)", () => {
  const dicom = { checkCalledAet: true, strictAetComparison: false };
  const supported = { abstractSyntaxes: new Map([["1.2.840.10008.1.1", "any" as const]]) };
  const request = (calling: string) => ({
    protocolVersion: 1,
    calledAeTitle: "ALPHA",
    callingAeTitle: calling,
    applicationContext: DICOM_APPLICATION_CONTEXT,
    presentationContexts: [VERIFICATION_CONTEXT],
    userInformation: { maxPduLength: 16384, implementationClassUid: "1.2.3.4", roleSelections: [], otherItems: [] },
  });
  const from = (address: string): Peer => ({ address, port: 1234 });

  test("AE titles, hosts, CIDRs and IPv4-mapped peers; refusals are permanent / service user / calling AE not recognized", async () => {
    const policy = createAssociationPolicy(
      { aet: "ALPHA", allowedCallers: [{ aet: "ANY" }, { aet: "CT", host: "10.0.0.0/8" }, { aet: "CT", host: "192.168.1.7" }, { aet: "MR", host: "2001:db8::/32" }] },
      dicom,
      supported,
    );
    await policy.ready;
    const ok = (calling: string, address: string) => "accept" in policy(request(calling), from(address));
    expect(ok("ANY", "203.0.113.9")).toBe(true);
    expect(ok("any", "203.0.113.9")).toBe(true); // StrictAetComparison false
    expect(ok("CT", "10.20.30.40")).toBe(true);
    expect(ok("CT", "::ffff:10.20.30.40")).toBe(true);
    expect(ok("CT", "192.168.1.7")).toBe(true);
    expect(ok("CT", "192.168.1.8")).toBe(false);
    expect(ok("MR", "2001:db8:1::1")).toBe(true);
    expect(ok("MR", "10.1.1.1")).toBe(false);
    const refusal = policy(request("NOBODY"), from("10.1.1.1"));
    expect(refusal).toMatchObject({
      reject: { result: RejectResult.Permanent, source: RejectSource.ServiceUser, reason: RejectReason.CallingAeTitleNotRecognized },
      why: expect.stringContaining('"NOBODY" is not in AllowedCallers'),
    });
    expect(policy(request("CT"), from("172.16.0.1"))).toMatchObject({ why: expect.stringContaining("allowed only from 10.0.0.0/8, 192.168.1.7, not from 172.16.0.1") });
    policy.close();
  });

  test("host names are resolved when the policy is created and refreshed; a failed look-up keeps the last addresses", async () => {
    let answer: string[] | Error = ["10.9.9.9", "::ffff:10.9.9.10"];
    const errors: string[] = [];
    const policy = createAssociationPolicy({ aet: "ALPHA", allowedCallers: [{ aet: "US", host: "Modality.Example.ORG" }] }, dicom, supported, {
      lookup: async (host) => {
        expect(host).toBe("modality.example.org");
        if (answer instanceof Error) throw answer;
        return answer;
      },
      refreshMs: 30,
      onLookupError: (host, e) => errors.push(`${host}: ${e.message}`),
    });
    await policy.ready;
    const ok = (address: string) => "accept" in policy(request("US"), from(address));
    expect(ok("10.9.9.9")).toBe(true);
    expect(ok("10.9.9.10")).toBe(true);
    expect(ok("10.9.9.11")).toBe(false);
    answer = ["10.9.9.11"];
    await until("the refresh picks up the new address", () => ok("10.9.9.11"), 5000, 20);
    expect(ok("10.9.9.9")).toBe(false);
    answer = new Error("ENOTFOUND");
    await until("a failed look-up is reported", () => errors.length > 0, 5000, 20);
    expect(errors[0]).toBe("modality.example.org: ENOTFOUND");
    expect(ok("10.9.9.11")).toBe(true);
    policy.close();
  });

  test("a host name that never resolved refuses everyone bound to it (fail closed)", async () => {
    const policy = createAssociationPolicy({ aet: "ALPHA", allowedCallers: [{ aet: "US", host: "nowhere.invalid" }] }, dicom, supported, {
      lookup: async () => {
        throw new Error("ENOTFOUND");
      },
    });
    await policy.ready;
    const r = policy(request("US"), from("127.0.0.1"));
    expect(r).toMatchObject({ why: expect.stringContaining("nowhere.invalid (not resolved)") });
    policy.close();
  });
});

describe("AllowedCallers (gateway, echoscu)", () => {
  let gw: TestGateway;
  beforeAll(async () => {
    gw = await gateway(
      [
        {
          AET: "ALPHA",
          AllowedCallers: ["MODALITY1", { AET: "LOOPCT", Host: "127.0.0.0/8" }, { AET: "FARCT", Host: "10.0.0.0/8" }, { AET: "NAMED", Host: "localhost" }, { AET: "WRONGIP", Host: "127.0.0.2" }],
        },
        { AET: "OPEN" },
      ],
      NO_ORTHANC,
    );
  });

  test("an allowed calling AE title without a host binding is accepted", async () => {
    const r = await echoscu(gw.portOf("ALPHA"), "ALPHA", ["-aet", "MODALITY1"]);
    expect(r.output).toContain("Received Echo Response (Success)");
    expect(r.code).toBe(0);
  });

  test("an unknown calling AE title is rejected: permanent, service user, calling AE title not recognized", async () => {
    const r = await echoscu(gw.portOf("ALPHA"), "ALPHA", ["-aet", "STRANGER"]);
    expect(r.code).not.toBe(0);
    expect(r.output).toContain("Association Rejected");
    expect(r.output).toContain("Result: Rejected Permanent");
    expect(r.output).toContain("Source: Service User");
    expect(r.output).toContain("Reason: Calling AE Title Not Recognized");
  });

  test("an AE title bound to a CIDR is accepted from inside it and rejected from outside it", async () => {
    expect((await echoscu(gw.portOf("ALPHA"), "ALPHA", ["-aet", "LOOPCT"])).code).toBe(0);
    const r = await echoscu(gw.portOf("ALPHA"), "ALPHA", ["-aet", "FARCT"]);
    expect(r.code).not.toBe(0);
    expect(r.output).toContain("Reason: Calling AE Title Not Recognized");
  });

  test("an AE title bound to a host name (resolved at start) or to another IP address", async () => {
    expect((await echoscu(gw.portOf("ALPHA"), "ALPHA", ["-aet", "NAMED"])).code).toBe(0);
    const r = await echoscu(gw.portOf("ALPHA"), "ALPHA", ["-aet", "WRONGIP"]);
    expect(r.code).not.toBe(0);
    expect(r.output).toContain("Reason: Calling AE Title Not Recognized");
  });

  test("the refusal as bytes, the metric and the other tenant (no AllowedCallers) taking anyone", async () => {
    const peer = await RawPeer.connect(gw.portOf("ALPHA"));
    peer.write(rq("ALPHA", "FARCT"));
    const pdu = await peer.next();
    expect(pdu?.type).toBe(PduType.AssociateRJ);
    expect(decodeAssociateRJ(pdu!.body)).toEqual({ result: 1, source: 1, reason: 3 });
    peer.close();
    expect((await echoscu(gw.portOf("OPEN"), "OPEN", ["-aet", "STRANGER"])).code).toBe(0);
    expect(await metricsText(gw)).toMatch(/dicom_gateway_associations_total\{tenant="ALPHA",result="rejected",reason="calling-ae-title-not-recognized"\} [4-9]/);
  });
});

describe("MaxAssociations per tenant and in total", () => {
  let gw: TestGateway;
  beforeAll(async () => {
    gw = await gateway(
      [
        { AET: "LIMITED", MaxAssociations: 2 },
        { AET: "OTHER", MaxAssociations: 3 },
      ],
      NO_ORTHANC,
      { Gateway: { Limits: { MaxAssociations: 4 } } },
    );
  });

  /** `n` associations held open on a tenant. */
  async function hold(aet: string, n: number): Promise<RawPeer[]> {
    const peers = await Promise.all(Array.from({ length: n }, () => RawPeer.connect(gw.portOf(aet))));
    const answers = await Promise.all(peers.map((p) => p.associate(aet, [VERIFICATION_CONTEXT])));
    for (const a of answers) expect(a?.type).toBe(PduType.AssociateAC);
    return peers;
  }

  async function closeAll(peers: RawPeer[]): Promise<void> {
    for (const p of peers) p.close();
    await Promise.all(peers.map((p) => p.closedPromise));
    await until("the gateway sees the connections closed", () => gw.listeners.every((l) => l.server.activeAssociations === 0), 5000, 20);
  }

  async function expectLimitRj(aet: string): Promise<void> {
    const extra = await RawPeer.connect(gw.portOf(aet));
    const answer = await extra.associate(aet, [VERIFICATION_CONTEXT]);
    expect(answer?.type).toBe(PduType.AssociateRJ);
    expect(decodeAssociateRJ(answer!.body)).toEqual({
      result: RejectResult.Transient,
      source: RejectSource.ServiceProviderPresentation,
      reason: RejectReason.LocalLimitExceeded,
    });
    extra.close();
  }

  test("past the tenant's limit: A-ASSOCIATE-RJ transient / service provider (presentation) / local limit exceeded, as echoscu prints it", async () => {
    const held = await hold("LIMITED", 2);
    try {
      expect(gw.listeners.find((l) => l.tenant.aet === "LIMITED")!.server.activeAssociations).toBe(2);
      await expectLimitRj("LIMITED");
      const r = await echoscu(gw.portOf("LIMITED"), "LIMITED");
      expect(r.code).not.toBe(0);
      expect(r.output).toContain("Result: Rejected Transient");
      expect(r.output).toContain("Source: Service Provider (Presentation Related)");
      expect(r.output).toContain("Reason: Local Limit Exceeded");
      // Another tenant is not affected.
      expect((await echoscu(gw.portOf("OTHER"), "OTHER")).code).toBe(0);
      const status = await (await fetch(gw.httpUrl + "/status")).json();
      expect(status.tenants.find((t: { aet: string }) => t.aet === "LIMITED").activeAssociations).toBe(2);
    } finally {
      await closeAll(held);
    }
    // A slot is free again.
    expect((await echoscu(gw.portOf("LIMITED"), "LIMITED")).code).toBe(0);
    expect(await metricsText(gw)).toMatch(/dicom_gateway_associations_total\{tenant="LIMITED",result="rejected",reason="local-limit-exceeded"\} 2/);
  });

  test("past the gateway-wide limit (Gateway.Limits.MaxAssociations) a tenant under its own limit is refused too", async () => {
    const held = [...(await hold("LIMITED", 2)), ...(await hold("OTHER", 2))];
    try {
      await expectLimitRj("OTHER");
      const r = await echoscu(gw.portOf("OTHER"), "OTHER");
      expect(r.output).toContain("Reason: Local Limit Exceeded");
    } finally {
      await closeAll(held);
    }
    expect((await echoscu(gw.portOf("OTHER"), "OTHER")).code).toBe(0);
  });

  test("concurrent connections never exceed the limit", async () => {
    const peers = await Promise.all(Array.from({ length: 8 }, () => RawPeer.connect(gw.portOf("OTHER"))));
    const answers = await Promise.all(peers.map((p) => p.associate("OTHER", [VERIFICATION_CONTEXT])));
    expect(answers.filter((a) => a?.type === PduType.AssociateAC).length).toBe(3);
    expect(answers.filter((a) => a?.type === PduType.AssociateRJ).length).toBe(5);
    await closeAll(peers);
  });

  test("MaxAssociations counts accepted associations only: 40 connections that send nothing leave both of LIMITED's slots to modalities", async () => {
    // Before, a connection counted from accept: two idle sockets from anywhere locked the tenant out until ARTIM.
    const silent = await Promise.all(Array.from({ length: 40 }, () => RawPeer.connect(gw.portOf("LIMITED"))));
    let held: RawPeer[] = [];
    try {
      await until("the gateway saw the idle connections", () => gw.listeners.find((l) => l.tenant.aet === "LIMITED")!.server.unassociatedConnections === 32, 5000, 20);
      held = await hold("LIMITED", 2);
      expect(gw.listeners.find((l) => l.tenant.aet === "LIMITED")!.server.activeAssociations).toBe(2);
      // Past the limit, the answer comes at the A-ASSOCIATE-RQ: RJ transient / local limit exceeded.
      await expectLimitRj("LIMITED");
      const status = await (await fetch(gw.httpUrl + "/status")).json();
      expect(status.tenants.find((t: { aet: string }) => t.aet === "LIMITED")).toMatchObject({ activeAssociations: 2, unassociatedConnections: expect.any(Number) });
    } finally {
      await closeAll([...held, ...silent]);
    }
    expect((await echoscu(gw.portOf("LIMITED"), "LIMITED")).code).toBe(0);
  });
});

describe("ARTIM timeout from Gateway.Limits.ArtimTimeoutSeconds", () => {
  test("a connection that sends no A-ASSOCIATE-RQ is closed after the configured time", async () => {
    const gw = await gateway([{ AET: "ARTIM" }], NO_ORTHANC, { Gateway: { Limits: { ArtimTimeoutSeconds: 1 } } });
    const peer = await RawPeer.connect(gw.portOf("ARTIM"));
    const t0 = Date.now();
    // Not a plain close: the gateway says why with an A-ABORT (service provider, reason not specified), then
    // closes; and at the configured 1 s, not at the default 30 s (next() gives up at 10 s).
    const pdu = await peer.next(10_000);
    expect(pdu?.type).toBe(PduType.Abort);
    expect(decodeAbort(pdu!.body)).toEqual({ source: AbortSource.ServiceProvider, reason: AbortReason.NotSpecified });
    await peer.closedPromise;
    expect(Date.now() - t0).toBeGreaterThan(800);
    expect((await echoscu(gw.portOf("ARTIM"), "ARTIM")).code).toBe(0);
  });
});
