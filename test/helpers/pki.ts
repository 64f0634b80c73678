/**
 * A private CA for DICOM TLS tests, made with the openssl command line tool (as docs/tls.md does): the CA,
 * server and client certificates (with subject alternative names when asked), revocation and CRLs
 * (`openssl ca`), and the facts tests compare with (serial, Not After).
 */
import { spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { tempDir } from "./temp.ts";

export class Pki {
  readonly dir: string;

  constructor(prefix = "gw-pki-") {
    const which = spawnSync("sh", ["-c", "command -v openssl"], { encoding: "utf8" });
    if (which.status !== 0 || !which.stdout.trim()) {
      throw new Error("the TLS tests need the openssl command line tool to make test certificates: install it (apt-get install openssl)");
    }
    this.dir = tempDir(prefix);
    writeFileSync(join(this.dir, "index.txt"), "");
    writeFileSync(join(this.dir, "crlnumber"), "1000\n");
    writeFileSync(
      join(this.dir, "ca.cnf"),
      ["[ ca ]", "default_ca = CA_default", "[ CA_default ]", "dir = .", "database = index.txt", "crlnumber = crlnumber", "certificate = ca.crt", "private_key = ca.key", "default_md = sha256", "default_crl_days = 30", ""].join("\n"),
    );
  }

  /** The path of a file of the PKI directory. */
  file(name: string): string {
    return join(this.dir, name);
  }

  openssl(args: string[]): string {
    const r = spawnSync("openssl", args, { cwd: this.dir, encoding: "utf8" });
    if (r.status !== 0) throw new Error(`openssl ${args.join(" ")} failed:\n${r.stderr}`);
    return r.stdout;
  }

  /** A self-signed CA `name`.crt/.key. */
  ca(name = "ca", subject = "/CN=Gateway Test CA"): void {
    this.openssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", `${name}.key`, "-out", `${name}.crt`, "-days", "2", "-subj", subject]);
  }

  /** A key and a certificate `name`.crt/.key signed by `ca`; `san` like "DNS:localhost,IP:127.0.0.1". */
  certificate(name: string, subject: string, opts: { ca?: string; usage: "server" | "client"; san?: string; days?: number }): void {
    const ext = ["basicConstraints=CA:FALSE", "keyUsage=digitalSignature,keyEncipherment", `extendedKeyUsage=${opts.usage === "server" ? "serverAuth" : "clientAuth"}`];
    if (opts.san) ext.push(`subjectAltName=${opts.san}`);
    writeFileSync(join(this.dir, `${name}.ext`), ext.join("\n") + "\n");
    const ca = opts.ca ?? "ca";
    this.openssl(["req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", subject]);
    this.openssl(["x509", "-req", "-in", `${name}.csr`, "-CA", `${ca}.crt`, "-CAkey", `${ca}.key`, "-CAcreateserial", "-out", `${name}.crt`, "-days", String(opts.days ?? 2), "-sha256", "-extfile", `${name}.ext`]);
  }

  /** Marks `name`.crt revoked in the CA's database (then crl() makes a CRL listing it). */
  revoke(name: string): void {
    this.openssl(["ca", "-config", "ca.cnf", "-revoke", `${name}.crt`]);
  }

  /** A CRL of the CA's database as `file` (PEM). */
  crl(file = "ca.crl"): string {
    this.openssl(["ca", "-config", "ca.cnf", "-gencrl", "-out", file]);
    return this.file(file);
  }

  /** The serial number of `name`.crt, upper-case hex as node:tls shows it. */
  serial(name: string): string {
    return this.openssl(["x509", "-in", `${name}.crt`, "-noout", "-serial"]).trim().replace(/^serial=/, "").toUpperCase();
  }

  /** The Not After of `name`.crt, seconds since the epoch. */
  notAfter(name: string): number {
    const text = this.openssl(["x509", "-in", `${name}.crt`, "-noout", "-enddate"]).trim().replace(/^notAfter=/, "");
    return Math.floor(Date.parse(text) / 1000);
  }
}
