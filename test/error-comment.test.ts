/** Error Comment (0000,0902) is LO, at most 64 characters: comments are fitted in whole words, never cut mid-word. */
import { expect, test } from "bun:test";
import { errorComment, ERROR_COMMENT_MAX, withUid } from "../src/services/error-comment.ts";

test("a comment that fits is kept; a longer one is cut at a word boundary with '...', within 64 characters", () => {
  expect(errorComment("Orthanc cannot transcode 1.2.840.10008.1.2.4.90")).toBe("Orthanc cannot transcode 1.2.840.10008.1.2.4.90");
  const long = "instance 1.2.826.0.1.3680043.8.498.12345678901234567890.4.1.2 is no longer in the tenant's label scope";
  const c = errorComment(long);
  expect(c.length).toBeLessThanOrEqual(ERROR_COMMENT_MAX);
  expect(c).toBe("instance 1.2.826.0.1.3680043.8.498.12345678901234567890.4.1.2...");
  // Words stay whole: what precedes "..." is a prefix of the text ending at a word boundary.
  const head = c.slice(0, -3);
  expect(long.startsWith(head)).toBe(true);
  expect(long[head.length]).toBe(" ");
});

test("control characters become spaces; a word longer than the room is cut hard rather than lost", () => {
  expect(errorComment("line one\nline\ttwo")).toBe("line one line two");
  const c = errorComment("x".repeat(100));
  expect(c).toBe(`${"x".repeat(61)}...`);
});

test("withUid: the UID when the whole comment fits, else the fallback (a UID cut short names nothing)", () => {
  expect(withUid("no SCP role context for ", "1.2.840.10008.5.1.4.1.1.2", "fallback")).toBe("no SCP role context for 1.2.840.10008.5.1.4.1.1.2");
  expect(withUid("no SCP role context for ", `1.2.${"9".repeat(60)}`, "the requester took no SCP role for an instance's SOP class")).toBe("the requester took no SCP role for an instance's SOP class");
});
