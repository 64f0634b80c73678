/**
 * The gateway part: the appliance's assembly — one DICOM listener per tenant, the forwarder, the Orthanc
 * monitor and the HTTP endpoint — and its public API (used by cli.ts and the tests). It may import every
 * other part of src/ but cli.ts (.dependency-cruiser.cjs). Its files: lifecycle.ts (start, stop),
 * tenants.ts (one tenant), reload.ts, snapshot.ts (/status), observers.ts (logs, metrics, audit), state.ts.
 */
export { startGateway, type Gateway, type GatewayOptions } from "./lifecycle.ts";
export { changedGlobalSettings, ReloadError, type ReloadResult } from "./reload.ts";
export type { TenantListener } from "./state.ts";
