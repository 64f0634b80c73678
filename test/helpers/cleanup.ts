/**
 * Preloaded by `bun test` (bunfig.toml): after every test file of the run has run, the temporary directories
 * the tests made and did not remove are removed (test/helpers/temp.ts).
 */
import { afterAll } from "bun:test";
import { removeTempDirs } from "./temp.ts";

afterAll(removeTempDirs);
