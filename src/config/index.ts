/**
 * Configuration: Orthanc's JSON file with the gateway's keys, loaded (load.ts: parse, env overrides,
 * normalization), validated (schema.ts: the keys; fields.ts: their values) and described (describe.ts).
 * config/ may import net/ and dicom/ types and shared/ (see .dependency-cruiser.cjs).
 */
export type * from "./types.ts";
export {
  ConfigError,
  type ConfigEnv,
  loadConfigFile,
  parseConfig,
  type ParseConfigOptions,
  validateConfig,
} from "./load.ts";
export { CONFIG_ENV_VARS } from "./schema.ts";
export { describeConfig } from "./describe.ts";
export { JsoncSyntaxError, parseJsonc, stripJsonc } from "./jsonc.ts";
