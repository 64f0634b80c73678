/** Configuration: loading, validation and description. See load.ts for the file format. */
export type * from "./types.ts";
export {
  CONFIG_ENV_VARS,
  ConfigError,
  type ConfigEnv,
  loadConfigFile,
  parseConfig,
  type ParseConfigOptions,
  validateConfig,
} from "./load.ts";
export { describeConfig } from "./describe.ts";
export { JsoncSyntaxError, parseJsonc, stripJsonc } from "./jsonc.ts";
