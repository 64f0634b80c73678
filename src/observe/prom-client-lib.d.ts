/** prom-client's own files (src/observe/prometheus.ts types them with prom-client's declarations). */
declare module "prom-client/lib/counter.js";
declare module "prom-client/lib/gauge.js";
declare module "prom-client/lib/histogram.js";
declare module "prom-client/lib/registry.js";
declare module "prom-client/lib/defaultMetrics.js";
