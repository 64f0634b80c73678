/**
 * A built-in module of the runtime (node:zlib, ...), loaded the first time it is asked for: Bun maps a
 * built-in's native code into memory when it is first loaded, and the gateway starts faster and smaller
 * without the ones no request has needed yet (README, "The appliance's footprint"). The same in Bun (source
 * and compiled binary), Deno and Node.
 */
import { createRequire } from "node:module";

export function lazyBuiltin<T>(name: `node:${string}`): () => T {
  let loaded: T | undefined;
  return () => (loaded ??= (typeof require === "function" ? require(name) : createRequire(import.meta.url)(name)) as T);
}
