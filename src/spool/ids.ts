/** Names of spool records and segment files. */
import { randomBytes } from "node:crypto";

let counter = 0;

/** Time-ordered, unique across restarts: milliseconds (base 36, fixed width), a counter, randomness. */
export function newSpoolId(): string {
  counter = (counter + 1) % 1_679_616;
  return `${Date.now().toString(36).padStart(9, "0")}-${counter.toString(36).padStart(4, "0")}-${randomBytes(4).toString("hex")}`;
}
