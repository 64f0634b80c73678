/** `dicom-gateway spool …`: not available yet in this commit (see the next one). */
import process from "node:process";

export async function spoolCommand(_argv: string[], _opts: { defaultConfig: string }): Promise<number> {
  process.stderr.write("dicom-gateway spool: not available in this build\n");
  return 2;
}
