/**
 * The DIMSE services a tenant listener offers: which abstract syntaxes it negotiates (with which
 * transfer syntaxes) and which handler answers each request command. Each service lives in its own
 * file under dimse/; this is the one place that puts them together.
 */
import type { DimseHandler } from "./dimse/association.ts";
import { CommandField, SopClass } from "./dimse/constants.ts";
import { handleEcho } from "./dimse/echo.ts";
import { UNCOMPRESSED_LITTLE_ENDIAN, type SupportedSyntaxes, type TransferSyntaxPolicy } from "./dimse/negotiation.ts";

export interface TenantServices {
  syntaxes: SupportedSyntaxes;
  handlers: Map<number, DimseHandler>;
}

export function createTenantServices(): TenantServices {
  const abstractSyntaxes = new Map<string, TransferSyntaxPolicy>([[SopClass.Verification, UNCOMPRESSED_LITTLE_ENDIAN]]);
  const handlers = new Map<number, DimseHandler>([[CommandField.CEchoRQ, handleEcho]]);
  return { syntaxes: { abstractSyntaxes }, handlers };
}
