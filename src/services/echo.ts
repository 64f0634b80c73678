/** Verification service (C-ECHO), PS3.4 Annex A and PS3.7 9.1.5: always answers Success. */
import type { DimseHandler } from "../net/association.ts";
import { Status } from "../net/constants.ts";

export const handleEcho: DimseHandler = async (_request, responder) => {
  await responder.respond({ status: Status.Success });
};
