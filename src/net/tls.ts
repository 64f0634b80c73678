/**
 * DICOM TLS of a listener (PS3.15 Annex B, the secure transport connection profiles): the PEM files it is
 * configured with, read into one secure context; what a handshake established, for the association policy
 * and the audit trail; and the certificates' expiry, for the metrics.
 *
 * - Versions and suites: TLS 1.2 and 1.3 only; TLS 1.2 with forward-secret (ECDHE) AEAD suites only, as the
 *   BCP 195 profiles of PS3.15 Annex B and RFC 9325 section 4.2 recommend (a static-RSA key exchange,
 *   `AES128-GCM-SHA256`, would let whoever gets the server key later read every recorded session); TLS 1.3
 *   suites are all forward-secret and kept as the TLS library has them.
 * - Renewal: the files are read again on request (SIGHUP, see gateway/reload.ts) and, when their *content*
 *   changed, a new secure context serves new connections; open associations keep theirs.
 */
import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { createSecureContext, type SecureContext, type SecureContextOptions, type TLSSocket } from "node:tls";
import { describeTlsRefusal, type TlsFilePart } from "../shared/tls-refusal.ts";

/** DICOM TLS (PS3.15 B.1) on a listener: PEM files, client verification, and where it listens. */
export interface TlsListenerOptions {
  /** PEM certificate chain file. */
  certificateFile: string;
  /** PEM private key file. */
  keyFile: string;
  /** PEM CA bundle to verify client certificates; undefined = no client verification. */
  caFile?: string;
  /** PEM certificate revocation list(s) of the CA; undefined = none. */
  crlFile?: string;
  /** Require a client certificate signed by caFile (default true when caFile is set). */
  requireClientCertificate: boolean;
  /**
   * The calling AE title of an association over TLS must be the verified client certificate's CN or one of
   * its subject alternative names (the association policy checks it; see tenancy/association-policy.ts).
   */
  requireCallingAetInCertificate?: boolean;
  /** TLS port; undefined = the listener's port speaks TLS only. When set, the port stays plain and this one adds TLS. */
  port?: number;
}

/**
 * TLS 1.2 suites: ECDHE key exchange (forward secrecy) with AEAD ciphers only. The TLS 1.3 names come first
 * because a list without any would disable TLS 1.3 under Node.js's OpenSSL (BoringSSL, Bun's, ignores them).
 */
export const TLS_CIPHERS = [
  "TLS_AES_256_GCM_SHA384",
  "TLS_CHACHA20_POLY1305_SHA256",
  "TLS_AES_128_GCM_SHA256",
  "ECDHE-ECDSA-AES256-GCM-SHA384",
  "ECDHE-RSA-AES256-GCM-SHA384",
  "ECDHE-ECDSA-CHACHA20-POLY1305",
  "ECDHE-RSA-CHACHA20-POLY1305",
  "ECDHE-ECDSA-AES128-GCM-SHA256",
  "ECDHE-RSA-AES128-GCM-SHA256",
].join(":");

/** What the TLS layer established, attached to the association's Peer (see TlsPeer in server.ts). */
export interface TlsPeerInfo {
  protocol?: string;
  cipher?: string;
  /** The client certificate verified against the CA bundle. */
  authorized: boolean;
  /** Why the client certificate did not verify, when one was presented and not required. */
  authorizationError?: string;
  /** Subject and issuer of the client certificate ("C=.., O=.., CN=.."), if one was presented. */
  clientSubject?: string;
  clientIssuer?: string;
  clientSerial?: string;
  /** The client certificate's subject CN(s). */
  clientCommonNames?: string[];
  /** The values of its subject alternative names ("DNS:ct1" gives "ct1"). */
  clientAltNames?: string[];
}

/** A certificate of a listener's files, for the expiry metric and /status. */
export interface CertificateInfo {
  /** `certificate` (the server's chain) or `ca` (a CA that client certificates must chain to). */
  kind: "certificate" | "ca";
  subject: string;
  serial: string;
  /** Not After, seconds since the epoch. */
  notAfter: number;
}

/** A file of the TLS configuration that cannot be read or used; names the key. */
export class TlsFileError extends Error {
  override name = "TlsFileError";
}

/** The listener's TLS files as last read: their bytes, and the certificates they hold. */
export class TlsMaterial {
  private constructor(
    readonly key: Uint8Array,
    readonly cert: Uint8Array,
    readonly ca: Uint8Array | undefined,
    readonly crl: Uint8Array | undefined,
    private readonly files: TlsListenerOptions,
  ) {}

  /** Reads every file; throws TlsFileError naming the one that cannot be read. */
  static read(opts: TlsListenerOptions): TlsMaterial {
    const read = (what: string, key: string, file: string) => {
      try {
        return readFileSync(file);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code ?? (err instanceof Error ? err.message : String(err));
        throw new TlsFileError(`cannot read the ${what} file ${file} (Tls.${key}): ${code}`, { cause: err });
      }
    };
    return new TlsMaterial(
      read("private key", "Key", opts.keyFile),
      read("certificate", "Certificate", opts.certificateFile),
      opts.caFile !== undefined ? read("CA", "CA", opts.caFile) : undefined,
      opts.crlFile !== undefined ? read("CRL", "CRL", opts.crlFile) : undefined,
      opts,
    );
  }

  /**
   * The secure context of these files. When OpenSSL refuses them, throws TlsFileError naming the file (and
   * its key) it refused (shared/tls-refusal.ts).
   */
  secureContext(): SecureContext {
    try {
      return createSecureContext(this.contextOptions());
    } catch (err) {
      const f = this.files;
      const parts: TlsFilePart[] = [
        { what: "private key", key: "Tls.Key", file: f.keyFile, options: { key: this.key } as SecureContextOptions },
        { what: "certificate", key: "Tls.Certificate", file: f.certificateFile, options: { cert: this.cert } as SecureContextOptions },
        ...(f.caFile !== undefined ? [{ what: "CA", key: "Tls.CA", file: f.caFile, options: { ca: this.ca } as SecureContextOptions } as const] : []),
        ...(f.crlFile !== undefined ? [{ what: "CRL", key: "Tls.CRL", file: f.crlFile, options: { crl: this.crl } as SecureContextOptions } as const] : []),
      ];
      throw new TlsFileError(describeTlsRefusal(parts, err), { cause: err });
    }
  }

  /** The secure-context options of these files (versions and suites included). */
  contextOptions(): SecureContextOptions {
    return {
      key: this.key,
      cert: this.cert,
      ...(this.ca ? { ca: this.ca } : {}),
      ...(this.crl ? { crl: this.crl } : {}),
      minVersion: "TLSv1.2",
      ciphers: TLS_CIPHERS,
      honorCipherOrder: true,
    } as SecureContextOptions;
  }

  /** Whether any file's content differs from `other`'s. */
  differsFrom(other: TlsMaterial): boolean {
    const same = (a: Uint8Array | undefined, b: Uint8Array | undefined) => (a === undefined || b === undefined ? a === b : Buffer.from(a).equals(b));
    return !same(this.key, other.key) || !same(this.cert, other.cert) || !same(this.ca, other.ca) || !same(this.crl, other.crl);
  }

  /** The certificates of the certificate file and the CA bundle, with their expiry (read once). */
  certificates(): CertificateInfo[] {
    this.parsed ??= [...pemCertificates(this.cert).map((c) => certificateInfo(c, "certificate")), ...(this.ca ? pemCertificates(this.ca).map((c) => certificateInfo(c, "ca")) : [])].filter(
      (c): c is CertificateInfo => c !== undefined,
    );
    return this.parsed;
  }

  private parsed: CertificateInfo[] | undefined;
}

/** The PEM certificate blocks of a file. */
function pemCertificates(pem: Uint8Array): string[] {
  return new TextDecoder().decode(pem).match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g) ?? [];
}

function certificateInfo(pem: string, kind: CertificateInfo["kind"]): CertificateInfo | undefined {
  try {
    const x = new X509Certificate(pem);
    const notAfter = Math.floor(Date.parse(x.validTo) / 1000);
    if (!Number.isFinite(notAfter)) return undefined;
    return { kind, subject: x.subject.split("\n").join(", "), serial: x.serialNumber, notAfter };
  } catch {
    return undefined; // a block the library cannot read: the secure context reports it
  }
}

/** What the handshake of `socket` established; facts for the policy and the audit trail, never a failure. */
export function tlsPeerInfo(socket: TLSSocket): TlsPeerInfo {
  const info: TlsPeerInfo = { authorized: socket.authorized === true };
  try {
    info.protocol = socket.getProtocol?.() ?? undefined;
    info.cipher = socket.getCipher?.()?.name;
    const cert = socket.getPeerCertificate?.();
    if (cert && Object.keys(cert).length > 0) {
      info.clientSubject = distinguishedName(cert.subject);
      info.clientIssuer = distinguishedName(cert.issuer);
      info.clientSerial = cert.serialNumber;
      const cn = (cert.subject as unknown as Record<string, unknown> | undefined)?.CN;
      info.clientCommonNames = cn === undefined ? [] : (Array.isArray(cn) ? cn : [cn]).map(String);
      // "DNS:ct1.example.org, URI:urn:x, IP Address:10.1.2.3": the values after each type.
      info.clientAltNames = (cert.subjectaltname ?? "")
        .split(/,\s*/)
        .map((s) => s.slice(s.indexOf(":") + 1).trim())
        .filter((s) => s !== "");
    }
    if (!socket.authorized && socket.authorizationError) info.authorizationError = String(socket.authorizationError);
  } catch {
    // Facts for the audit trail only: never fail the connection over them.
  }
  return info;
}

/** A TLS error as one line, with its code. */
export function describeTlsError(err: Error): string {
  const code = (err as NodeJS.ErrnoException).code;
  return code && !err.message.includes(code) ? `${err.message} (${code})` : err.message;
}

/** "C=FR, O=Hospital, CN=CT01" from node:tls's certificate subject/issuer object. */
function distinguishedName(name: unknown): string | undefined {
  if (!name || typeof name !== "object") return typeof name === "string" ? name : undefined;
  const n = name as Record<string, unknown>;
  const parts = Object.entries(n).map(([k, v]) => `${k}=${Array.isArray(v) ? v.join("+") : String(v)}`);
  return parts.length > 0 ? parts.join(", ") : undefined;
}
