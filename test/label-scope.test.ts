/**
 * The label scope of a retrieve (src/services/resolve.ts) is the one of src/tenancy/label-scope.ts:
 * its anchor level for every LabelsStoreLevels combination, and its label rule for All/Any/None.
 */
import { describe, expect, test } from "bun:test";
import type { LabelsConstraint, ResourceLevel } from "../src/config/types.ts";
import { labelsInScope, tenantLabelScope } from "../src/services/resolve.ts";
import { inScope, labeledLevels } from "../src/tenancy/label-scope.ts";

/**
 * Every LabelsStoreLevels combination, with the anchor resolve.ts has always used (the first of
 * Study, Series, Instance, Patient that is stored; Study when none is) and label-scope.ts's levels
 * (Patient ignored when a lower level is labeled).
 */
const COMBINATIONS: [stored: ResourceLevel[], anchor: ResourceLevel, labeled: ResourceLevel[]][] = [
  [[], "Study", ["Study"]],
  [["Patient"], "Patient", ["Patient"]],
  [["Study"], "Study", ["Study"]],
  [["Series"], "Series", ["Series"]],
  [["Instance"], "Instance", ["Instance"]],
  [["Patient", "Study"], "Study", ["Study"]],
  [["Patient", "Series"], "Series", ["Series"]],
  [["Patient", "Instance"], "Instance", ["Instance"]],
  [["Study", "Series"], "Study", ["Study", "Series"]],
  [["Study", "Instance"], "Study", ["Study", "Instance"]],
  [["Series", "Instance"], "Series", ["Series", "Instance"]],
  [["Patient", "Study", "Series"], "Study", ["Study", "Series"]],
  [["Patient", "Study", "Instance"], "Study", ["Study", "Instance"]],
  [["Patient", "Series", "Instance"], "Series", ["Series", "Instance"]],
  [["Study", "Series", "Instance"], "Study", ["Study", "Series", "Instance"]],
  [["Patient", "Study", "Series", "Instance"], "Study", ["Study", "Series", "Instance"]],
];

/** The rule tenantLabelScope had before it used label-scope.ts. */
function previousAnchor(stored: readonly ResourceLevel[]): ResourceLevel {
  const order: ResourceLevel[] = ["Study", "Series", "Instance", "Patient"];
  return order.find((l) => stored.includes(l)) ?? "Study";
}

const tenant = (labelsStoreLevels: ResourceLevel[], labels = ["a"], labelsConstraint: LabelsConstraint = "All") => ({ labels, labelsConstraint, labelsStoreLevels });

describe("retrieve anchor level = the highest of label-scope's labeled levels", () => {
  test("the table covers all 16 combinations once", () => {
    expect(new Set(COMBINATIONS.map(([s]) => [...s].sort().join(","))).size).toBe(16);
  });

  for (const [stored, anchor, labeled] of COMBINATIONS) {
    test(`LabelsStoreLevels [${stored.join(", ")}] -> ${anchor}`, () => {
      expect(previousAnchor(stored)).toBe(anchor);
      expect(labeledLevels(tenant(stored))).toEqual(labeled);
      expect(tenantLabelScope(tenant(stored)).level).toBe(anchor);
      // The order of the configured list does not matter.
      expect(tenantLabelScope(tenant([...stored].reverse())).level).toBe(anchor);
      expect(tenantLabelScope(tenant(stored, ["x", "y"], "Any"))).toEqual({ labels: ["x", "y"], constraint: "Any", level: anchor });
    });
  }
});

describe("labelsInScope is label-scope's inScope", () => {
  const cases: [labels: string[], constraint: LabelsConstraint, resource: string[], expected: boolean][] = [
    [["a", "b"], "All", ["a", "b", "c"], true],
    [["a", "b"], "All", ["a"], false],
    [["a", "b"], "Any", ["b"], true],
    [["a", "b"], "Any", ["c"], false],
    [["a", "b"], "Any", [], false],
    [["a", "b"], "None", ["c"], true],
    [["a", "b"], "None", [], true],
    [["a", "b"], "None", ["a", "c"], false],
    [[], "All", [], true],
    [[], "Any", ["x"], true],
    [[], "None", ["x"], true],
  ];
  for (const [labels, constraint, resource, expected] of cases) {
    test(`${constraint} [${labels.join(", ")}] on a resource labeled [${resource.join(", ")}]: ${expected}`, () => {
      expect(labelsInScope({ labels, constraint }, resource)).toBe(expected);
      expect(inScope(resource, tenant(["Study"], labels, constraint))).toBe(expected);
    });
  }
});
