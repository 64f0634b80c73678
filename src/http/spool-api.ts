/**
 * The spool's API (`dicom-gateway spool …` talks to the running gateway through it), answered only on
 * the loopback address: the instances carry patient identifiers, and retry and release change the spool.
 *
 *   GET  /spool?tenant=AET&state=pending|quarantined   { instances: [...] }
 *   GET  /spool/{ref}                                   one instance (ref: spool id or SOP Instance UID)
 *   GET  /spool/{ref}/file                              its Part 10 file (application/dicom)
 *   POST /spool/{ref}/retry                             a quarantined instance back into the queue
 *   POST /spool/{ref}/release   {"reason"?}             a quarantined instance dropped (audited)
 *   POST /spool/purge           {"tenant"?, "olderThanDays"?, "reason"?}   quarantined instances dropped
 *
 * Refused (403) unless the peer is a loopback address and the request names a loopback host (a web page
 * whose name was pointed at 127.0.0.1 — DNS rebinding — sends its own host name); a POST must carry
 * `X-Dicom-Gateway-Spool: 1`, which a browser cannot send to another origin without asking first
 * (CORS preflight, never granted here). `X-Dicom-Gateway-User` names who asked, for the audit trail.
 */
import type { Context, Hono } from "hono";

/** What the API needs of the spool (src/spool/admin.ts, SpoolAdmin). */
export interface SpoolApi {
  list(filter: { tenant?: string; state?: "pending" | "quarantined" }): unknown[];
  show(ref: string): unknown;
  export(ref: string): { instance: { id: string; sopInstanceUid: string }; body: ReadableStream<Uint8Array> };
  retry(ref: string, by: string): Promise<unknown>;
  release(ref: string, by: string, why?: string): Promise<unknown>;
  purge(filter: { tenant?: string; olderThanDays?: number }, by: string, why?: string): Promise<unknown[]>;
}

/** What the runtime adapter tells of the connection (src/adapter). */
export interface ConnectionInfo {
  remoteAddress?: string;
}

export type HttpEnv = { Bindings: ConnectionInfo };

/** The header a POST must carry. */
export const SPOOL_POST_HEADER = "X-Dicom-Gateway-Spool";
/** Who asked (the CLI sends the user's name), for the audit trail. */
export const SPOOL_USER_HEADER = "X-Dicom-Gateway-User";

/** 127.0.0.0/8, ::1 and their IPv4-mapped forms. */
export function isLoopbackAddress(address: string | undefined): boolean {
  if (!address) return false;
  const a = address.toLowerCase().replace(/^::ffff:/, "");
  return a === "::1" || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(a);
}

/** The host a request names (Host header, port and brackets taken off) is a loopback one. */
function namesLoopbackHost(host: string | undefined): boolean {
  if (!host) return false;
  const name = host.startsWith("[") ? host.slice(1, host.indexOf("]")) : host.replace(/:\d+$/, "");
  return name.toLowerCase() === "localhost" || isLoopbackAddress(name);
}

function fail(c: Context, e: unknown): Response {
  const status = (e as { status?: unknown }).status;
  if (status === 400 || status === 404 || status === 409) return c.json({ error: (e as Error).message }, status);
  throw e;
}

export function addSpoolRoutes(app: Hono<HttpEnv>, api: SpoolApi): void {
  app.use("/spool", guard);
  app.use("/spool/*", guard);
  const by = (c: Context<HttpEnv>) => {
    const user = (c.req.header(SPOOL_USER_HEADER) ?? "").replace(/[^\w .@()=,-]/g, "").slice(0, 100);
    return `${user || "an unnamed user"} (HTTP API, ${c.env?.remoteAddress ?? "?"})`;
  };
  const body = async (c: Context<HttpEnv>): Promise<Record<string, unknown>> => {
    const text = await c.req.text();
    if (text.trim() === "") return {};
    const parsed: unknown = JSON.parse(text);
    return parsed && typeof parsed === "object" ? (parsed as Record<string, unknown>) : {};
  };

  app.get("/spool", (c) => {
    const state = c.req.query("state");
    if (state !== undefined && state !== "pending" && state !== "quarantined") return c.json({ error: `state must be pending or quarantined, got ${state}` }, 400);
    try {
      return c.json({ instances: api.list({ tenant: c.req.query("tenant"), state }) });
    } catch (e) {
      return fail(c, e);
    }
  });
  app.post("/spool/purge", async (c) => {
    try {
      const b = await body(c);
      const days = b.olderThanDays;
      if (days !== undefined && (typeof days !== "number" || !(days >= 0))) return c.json({ error: "olderThanDays must be a number >= 0" }, 400);
      const released = await api.purge({ tenant: typeof b.tenant === "string" ? b.tenant : undefined, olderThanDays: days }, by(c), typeof b.reason === "string" ? b.reason : undefined);
      return c.json({ released });
    } catch (e) {
      return fail(c, e);
    }
  });
  app.get("/spool/:ref", (c) => {
    try {
      return c.json(api.show(c.req.param("ref")));
    } catch (e) {
      return fail(c, e);
    }
  });
  app.get("/spool/:ref/file", (c) => {
    try {
      const { instance, body: stream } = api.export(c.req.param("ref"));
      return new Response(stream, { headers: { "Content-Type": "application/dicom", "Content-Disposition": `attachment; filename="${instance.id}.dcm"`, "Cache-Control": "no-store" } });
    } catch (e) {
      return fail(c, e);
    }
  });
  app.post("/spool/:ref/retry", async (c) => {
    try {
      return c.json(await api.retry(c.req.param("ref"), by(c)));
    } catch (e) {
      return fail(c, e);
    }
  });
  app.post("/spool/:ref/release", async (c) => {
    try {
      const b = await body(c);
      return c.json(await api.release(c.req.param("ref"), by(c), typeof b.reason === "string" ? b.reason : undefined));
    } catch (e) {
      return fail(c, e);
    }
  });
}

async function guard(c: Context<HttpEnv>, next: () => Promise<void>): Promise<Response | void> {
  if (!isLoopbackAddress(c.env?.remoteAddress) || !namesLoopbackHost(c.req.header("host"))) {
    return c.json({ error: "the spool API answers on the loopback address only (127.0.0.1 or ::1): run dicom-gateway spool on the gateway's host" }, 403);
  }
  if (c.req.method === "POST" && c.req.header(SPOOL_POST_HEADER) !== "1") {
    return c.json({ error: `a POST to the spool API must carry the header ${SPOOL_POST_HEADER}: 1 (dicom-gateway spool sends it)` }, 403);
  }
  await next();
}
