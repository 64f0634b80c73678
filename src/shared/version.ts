/** The gateway's version, from package.json (embedded into the compiled binary by `bun build`). */
import pkg from "../../package.json" with { type: "json" };

export const VERSION: string = pkg.version;
