/**
 * Which TLS file OpenSSL refuses. A secure context made of several PEM files fails as a whole, with
 * OpenSSL's words only ("NO_START_LINE", "KEY_VALUES_MISMATCH"); here each file is tried on its own, then
 * the key with the certificate, so that the message names the file and the configuration key that names it.
 * Used for the listeners' `Tls` files and for `Gateway.Orthanc.Tls`. Where the runtime checks nothing when
 * a context is made (Deno), nothing is found here and the first handshake says it.
 */
import { createSecureContext, type SecureContextOptions } from "node:tls";

export interface TlsFilePart {
  /** "private key", "certificate", "CA" or "CRL". */
  what: "private key" | "certificate" | "CA" | "CRL";
  /** The configuration key naming the file, e.g. "Tls.Key" or "Gateway.Orthanc.Tls.Key". */
  key: string;
  file: string;
  /** The file's content as the context option it is (`{ key }`, `{ cert }`, `{ ca }`, `{ crl }`). */
  options: SecureContextOptions;
}

/** Tries the parts together: undefined when OpenSSL takes them, else a message naming what it refuses. */
export function tlsRefusal(parts: readonly TlsFilePart[], extra: SecureContextOptions = {}): string | undefined {
  try {
    createSecureContext(Object.assign({}, ...parts.map((p) => p.options), extra) as SecureContextOptions);
    return undefined;
  } catch (err) {
    return describeTlsRefusal(parts, err);
  }
}

/** The message for `err`, the failure of a context made of `parts`. */
export function describeTlsRefusal(parts: readonly TlsFilePart[], err: unknown): string {
  for (const p of parts) {
    try {
      createSecureContext(p.options);
    } catch (e) {
      return `the ${p.what} file ${p.file} (${p.key}) cannot be used: ${e instanceof Error ? e.message : String(e)}`;
    }
  }
  const message = err instanceof Error ? err.message : String(err);
  const key = parts.find((p) => p.what === "private key");
  const cert = parts.find((p) => p.what === "certificate");
  if (key && cert && /KEY_VALUES_MISMATCH|key values mismatch/i.test(message)) {
    return `the private key ${key.file} (${key.key}) is not the key of the certificate ${cert.file} (${cert.key}): ${message}`;
  }
  return `${message} (check ${parts.map((p) => p.key).join(", ")})`;
}
