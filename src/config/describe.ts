/**
 * A human-readable summary of the effective configuration, printed by
 * `dicom-gateway check-config`. Never prints the Orthanc password.
 */
import type { GatewayConfig } from "./types.ts";

/** The URL with any embedded password replaced by "(set)". */
function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password === "") return url;
    u.password = "(set)";
    return u.toString().replace("%28set%29", "(set)").replace(/\/+$/, "");
  } catch {
    return url;
  }
}

/** host:port, with brackets around an IPv6 address. */
function hostPort(host: string, port: number): string {
  return host.includes(":") && !host.startsWith("[") ? `[${host}]:${port}` : `${host}:${port}`;
}

const onOff = (b: boolean) => (b ? "on" : "off");

export function describeConfig(cfg: GatewayConfig): string {
  const lines: string[] = [];
  const aetWidth = Math.max(0, ...cfg.tenants.map((t) => t.aet.length));
  lines.push(`Tenants (${cfg.tenants.length}):`);
  for (const t of cfg.tenants) {
    const levels = t.labelsStoreLevels.length > 0 ? t.labelsStoreLevels.join(",") : "(none)";
    lines.push(
      `  ${t.aet.padEnd(aetWidth)}  port ${t.port}  labels [${t.labels.join(",")}] ${t.labelsConstraint}  store levels ${levels}`,
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
    `Orthanc: ${redactUrl(o.url)}  user ${o.username === "" ? "(none)" : o.username}  ` +
      `password ${o.password === "" ? "(none)" : "(set)"}  timeout ${o.timeoutMs / 1000} s`,
  );
  lines.push(`HTTP: ${hostPort(cfg.http.host, cfg.http.port)}${cfg.http.port === 0 ? " (any free port)" : ""}`);
  lines.push(`Spool directory: ${cfg.spoolDirectory}`);
  lines.push(`Log: level ${cfg.log.level}, format ${cfg.log.format}`);
  return lines.join("\n");
}
