/**
 * What a failed TLS connection to Orthanc (or to the TLS proxy in front of it) means, and what to fix
 * (`Gateway.Orthanc.Tls`, `Gateway.Orthanc.Url`): the codes OpenSSL and BoringSSL report through node:tls
 * (X509 verification, RFC 8446 alerts), and the answers nginx gives a client whose certificate it refuses
 * (it answers HTTP 400 instead of ending the handshake).
 */

/** Which of Gateway.Orthanc.Tls's files are set. */
export interface TlsConfigured {
  ca: boolean;
  cert: boolean;
}

const UNTRUSTED = /UNABLE_TO_VERIFY_LEAF_SIGNATURE|SELF_SIGNED_CERT_IN_CHAIN|DEPTH_ZERO_SELF_SIGNED_CERT|UNABLE_TO_GET_ISSUER_CERT|CERT_SIGNATURE_FAILURE|CERT_UNTRUSTED|unable to verify|self[- ]signed|unknown ca|issuer certificate/i;

/** The fix for a TLS handshake that failed with `code` / `message`. */
export function tlsFailureHint(code: string, message: string, configured: TlsConfigured): string {
  const both = `${code} ${message}`;
  if (UNTRUSTED.test(both)) {
    return configured.ca
      ? "the server's certificate is not signed by the CA in Gateway.Orthanc.Tls.CA: give the CA (PEM) that signed the certificate of Orthanc or of its TLS proxy"
      : "the server's certificate is not signed by a CA the system trusts: set Gateway.Orthanc.Tls.CA to the CA (PEM) that signed it";
  }
  if (/CERT_HAS_EXPIRED|expired/i.test(both)) return "the server's certificate has expired: renew it on the server";
  if (/CERT_NOT_YET_VALID|not yet valid/i.test(both)) return "the server's certificate is not yet valid: check the clocks of both machines";
  if (/ALTNAME|hostname|host name|subject/i.test(both)) return "the server's certificate does not name the host of Gateway.Orthanc.Url: use a host name or address the certificate was issued for";
  if (/CERTIFICATE_REQUIRED|certificate required|peer did not return a certificate/i.test(both)) {
    return configured.cert
      ? "the server refused the client certificate of Gateway.Orthanc.Tls.Certificate: it must be signed by a CA the server trusts"
      : "the server requires a client certificate: set Gateway.Orthanc.Tls.Certificate and Gateway.Orthanc.Tls.Key";
  }
  if (/BAD_CERTIFICATE|bad certificate|UNKNOWN_CA|unknown ca|certificate unknown|DECRYPT_ERROR/i.test(both)) {
    return "the server refused the client certificate of Gateway.Orthanc.Tls.Certificate: it must be signed by a CA the server trusts, and match Gateway.Orthanc.Tls.Key";
  }
  if (/KEY_VALUES_MISMATCH|key values mismatch|PEM|private key|NO_START_LINE/i.test(both)) {
    return "Gateway.Orthanc.Tls.Certificate and Key cannot be used: each must be a PEM file, the key the certificate's own";
  }
  if (/WRONG_VERSION_NUMBER|wrong version|packet length|record layer|ECONNRESET|closed/i.test(both)) {
    return "the server does not speak TLS on that port: check the scheme and port of Gateway.Orthanc.Url";
  }
  return "check Gateway.Orthanc.Url (an https server?) and the files of Gateway.Orthanc.Tls";
}

/**
 * What an HTTP answer from a TLS proxy (nginx) refusing the client means, or undefined when the answer
 * is not such a refusal: nginx's `ssl_verify_client` answers 400 with one of these phrases in its page.
 */
export function tlsRefusalByProxy(status: number, text: string, configured: TlsConfigured): string | undefined {
  if (status !== 400 && status !== 495 && status !== 496 && status !== 497) return undefined;
  if (status === 496 || /No required SSL certificate was sent/i.test(text)) {
    return configured.cert
      ? "it received no client certificate: check Gateway.Orthanc.Tls.Certificate and Key"
      : "it requires a client certificate: set Gateway.Orthanc.Tls.Certificate and Gateway.Orthanc.Tls.Key";
  }
  if (status === 495 || /The SSL certificate error/i.test(text)) {
    return "it refused the client certificate of Gateway.Orthanc.Tls.Certificate: it must be signed by a CA the proxy trusts (nginx: ssl_client_certificate) and be valid";
  }
  if (status === 497 || /plain HTTP request was sent to HTTPS port/i.test(text)) {
    return "that port speaks HTTPS: write https:// in Gateway.Orthanc.Url (and set Gateway.Orthanc.Tls)";
  }
  return undefined;
}
