/**
 * A human-readable summary of the effective configuration, printed by
 * `dicom-gateway check-config`. Never prints the Orthanc password, nor credentials of a URL.
 */
import { redactUrlCredentials } from "../shared/redact.ts";
import type { GatewayConfig } from "./types.ts";

/** host:port, with brackets around an IPv6 address. */
function hostPort(host: string, port: number): string {
  return host.includes(":") && !host.startsWith("[") ? `[${host}]:${port}` : `${host}:${port}`;
}

const onOff = (b: boolean) => (b ? "on" : "off");

/** Bytes as megabytes, without the noise of binary rounding (1.1 MB stays "1.1"). */
const megabytes = (bytes: number) => String(Number((bytes / (1024 * 1024)).toPrecision(6)));

/** Milliseconds as seconds. */
const secs = (ms: number) => `${ms / 1000} s`;

export function describeConfig(cfg: GatewayConfig): string {
  const lines: string[] = [];
  const aetWidth = Math.max(0, ...cfg.tenants.map((t) => t.aet.length));
  lines.push(`Tenants (${cfg.tenants.length}):`);
  for (const t of cfg.tenants) {
    const levels = t.labelsStoreLevels.length > 0 ? t.labelsStoreLevels.join(",") : "(none)";
    const allowed = t.allowedDestinations === undefined
      ? ""
      : `  allowed destinations ${t.allowedDestinations.length > 0 ? t.allowedDestinations.join(",") : "(none)"}`;
    const callers = t.allowedCallers === undefined
      ? ""
      : `  callers ${
        t.allowedCallers.length > 0 ? t.allowedCallers.map((c) => (c.host === undefined ? c.aet : `${c.aet}@${c.host}`)).join(",") : "(none)"
      }`;
    const tls = t.tls === undefined
      ? ""
      : `  ${t.tls.port === undefined ? "tls (Port is TLS)" : `tls on port ${t.tls.port}`}` +
        (t.tls.requireClientCertificate ? ", client certificates required" : "") +
        (t.tls.requireCallingAetInCertificate ? ", calling AE in the certificate" : "") +
        (t.tls.crlFile !== undefined ? ", CRL" : "");
    const address = t.listenAddress === "0.0.0.0" ? "" : `  address ${t.listenAddress}`;
    const unassociated = t.maxUnassociatedConnections === cfg.limits.maxUnassociatedConnectionsPerTenant ? "" : ` (+${t.maxUnassociatedConnections} not yet associated)`;
    lines.push(
      `  ${t.aet.padEnd(aetWidth)}  port ${t.port}${address}  labels [${t.labels.join(",")}] ${t.labelsConstraint}  store levels ${levels}` +
        `  forwarding ${t.forwarding}  quota ${megabytes(t.spoolQuotaBytes)} MB${allowed}` +
        `  isolation ${t.isolation}  max associations ${t.maxAssociations}${unassociated}${callers}${tls}`,
    );
  }
  lines.push(`DICOM modalities (${cfg.modalities.length}):`);
  if (cfg.modalities.length === 0) lines.push("  (none)");
  const nameWidth = Math.max(0, ...cfg.modalities.map((m) => m.name.length));
  for (const m of cfg.modalities) {
    lines.push(`  ${m.name.padEnd(nameWidth)}  AET ${m.aet}  ${hostPort(m.host, m.port)}`);
  }
  const d = cfg.dicom;
  lines.push(
    `DICOM: default AET ${d.defaultAet}, check called AET ${onOff(d.checkCalledAet)}, ` +
      `strict AET comparison ${onOff(d.strictAetComparison)}, ` +
      `SCP timeout ${d.scpTimeoutSeconds === 0 ? "none" : `${d.scpTimeoutSeconds} s`}, ` +
      `maximum PDU length ${d.maximumPduLength}, default encoding ${d.defaultEncoding}`,
  );
  const o = cfg.orthanc;
  lines.push(
    `Orthanc: ${o.urls.map(redactUrlCredentials).join(", ")}${o.urls.length > 1 ? ` (cluster of ${o.urls.length} nodes)` : ""}  user ${o.username === "" ? "(none)" : o.username}  ` +
      `password ${o.password === "" ? "(none)" : "(set)"}  timeout ${secs(o.timeoutMs)}  ` +
      `upload concurrency ${o.uploadConcurrency}${o.maxUploadConcurrency > o.uploadConcurrency ? `-${o.maxUploadConcurrency}` : ""}  receive priority ${o.receivePriorityMs} ms  unreachable grace ${secs(o.unreachableGraceMs)}` +
      (o.tls ? `  TLS: CA ${o.tls.caFile ?? "(system)"}, client certificate ${o.tls.certificateFile ?? "(none)"}` : ""),
  );
  lines.push(`HTTP: ${hostPort(cfg.http.host, cfg.http.port)}${cfg.http.port === 0 ? " (any free port)" : ""}`);
  const sp = cfg.spool;
  lines.push(
    `Spool: ${sp.directory}  default quota ${megabytes(sp.defaultQuotaBytes)} MB  ` +
      `high-water mark ${sp.highWaterMarkPercent}%  verify integrity ${onOff(sp.verifyIntegrity)}`,
  );
  const st = cfg.store;
  const syntaxes = st.acceptedTransferSyntaxes.length > 0 ? st.acceptedTransferSyntaxes.join(",") : "(none)";
  lines.push(
    `Store: unknown SOP classes ${st.unknownSopClassAccepted ? "accepted" : "rejected"}, transfer syntaxes ${syntaxes}`,
  );
  const f = cfg.find;
  lines.push(
    `Find: case-sensitive PN ${onOff(f.caseSensitivePN)}, ` +
      `limit ${f.limitFindResults === 0 ? "none" : `${f.limitFindResults} results`}, ` +
      `page size ${f.pageSize}, timeout ${secs(f.timeoutMs)}`,
  );
  const mv = cfg.move;
  lines.push(
    `Move: connect timeout ${secs(mv.connectTimeoutMs)}, parallelism ${mv.parallelism}, ` +
      `pending every ${secs(mv.pendingIntervalMs)} or ${mv.pendingEvery} sub-operations`,
  );
  const sc = cfg.storageCommitment;
  lines.push(`Storage Commitment: wait for spooled instances ${secs(sc.waitMs)}, reports retried for ${sc.reportExpiryMs === 0 ? "ever" : `${sc.reportExpiryMs / 3600_000} h`}`);
  const lim = cfg.limits;
  lines.push(
    `Limits: max associations ${lim.maxAssociations}, per tenant ${lim.maxAssociationsPerTenant} by default, ` +
      `ARTIM timeout ${secs(lim.artimTimeoutMs)}, drain ${secs(lim.drainMs)}; not yet associated: ${lim.maxUnassociatedConnections} in total, ` +
      `${lim.maxUnassociatedConnectionsPerTenant} per tenant by default, ${lim.maxUnassociatedConnectionsPerAddress} per peer address`,
  );
  lines.push(`Audit: ${cfg.audit.file === "" ? "stdout" : cfg.audit.file}`);
  lines.push(`Log: level ${cfg.log.level}, format ${cfg.log.format}`);
  return lines.join("\n");
}
