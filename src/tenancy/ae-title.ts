/** AE title comparison. Orthanc's `StrictAetComparison` (default false) makes it case-sensitive. */
export function aeTitlesEqual(a: string, b: string, strict: boolean): boolean {
  const x = a.trim();
  const y = b.trim();
  return strict ? x === y : x.toUpperCase() === y.toUpperCase();
}
