/** DIMSE handlers for protocol tests. */
import type { DimseHandler } from "../../src/net/association.ts";
import { Status } from "../../src/net/constants.ts";
import { sleep } from "./wait.ts";

/** For a test-only SOP class: reads the identifier, answers Pending `pendings` times, one every `everyMs`, then Success; Cancel once cancelled. */
export function pendingUntilCancelled(pendings: number, everyMs: number): DimseHandler {
  return async (req, res) => {
    await req.dataset?.readAll(1 << 16);
    for (let i = 0; i < pendings; i++) {
      if (req.signal.aborted) return res.respond({ status: Status.Cancel });
      await res.respond({ status: Status.Pending });
      await sleep(everyMs);
    }
    await res.respond({ status: Status.Success });
  };
}
