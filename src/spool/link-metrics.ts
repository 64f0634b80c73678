/**
 * The link to Orthanc as metrics (issue 18): REST calls and round trips by what they are for, the
 * connections opened (each a TCP handshake, and a TLS one for https), Orthanc's round trip, and how many
 * uploads run at once. Read from the client and the forwarder when scraped.
 */
import { Gauge, type Registry } from "prom-client";
import type { OrthancApi } from "../orthanc/nodes.ts";
import type { Forwarder } from "./forwarder.ts";

export function registerLinkMetrics(registry: Registry, orthanc: OrthancApi, forwarder: Forwarder): void {
  // Counters read from the client's own counts: Gauges with collect() (prom-client counters cannot be set).
  new Gauge({
    name: "dicom_gateway_orthanc_calls_total",
    help: "REST calls to Orthanc by what they are for (upload, label, lookup, find, changes, system, instance-file, resource, delete, other).",
    labelNames: ["call"] as const,
    registers: [registry],
    collect() {
      for (const [call, n] of Object.entries(orthanc.calls)) this.set({ call }, n!.calls);
    },
  });
  new Gauge({
    name: "dicom_gateway_orthanc_round_trips_total",
    help: "Round trips to Orthanc by the call that opened them: calls pipelined behind another (labels behind an upload) take none of their own.",
    labelNames: ["call"] as const,
    registers: [registry],
    collect() {
      for (const [call, n] of Object.entries(orthanc.calls)) this.set({ call }, n!.roundTrips);
    },
  });
  new Gauge({
    name: "dicom_gateway_orthanc_connections_total",
    help: "Connections opened to Orthanc (each a TCP handshake, and a TLS one for https): few while keep-alive works.",
    registers: [registry],
    collect() {
      this.set(orthanc.stats.connections);
    },
  });
  new Gauge({
    name: "dicom_gateway_orthanc_round_trip_seconds",
    help: "The least round trip of recent small calls to Orthanc (the link's round trip plus Orthanc's quickest answer).",
    registers: [registry],
    collect() {
      const ms = orthanc.roundTripMs;
      if (ms !== undefined) this.set(ms / 1000);
    },
  });
  new Gauge({
    name: "dicom_gateway_orthanc_upload_concurrency",
    help: "Uploads of spooled instances allowed at once now (adapted between Gateway.Orthanc.UploadConcurrency and MaxUploadConcurrency).",
    registers: [registry],
    collect() {
      this.set(forwarder.uploadLimit);
    },
  });
}
