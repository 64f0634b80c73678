/**
 * prom-client's metric classes, loaded from its own files rather than its index: the index also loads
 * its Pushgateway (node:http, node:https, node:zlib) and its cluster aggregator (node:cluster), which the
 * gateway never uses and which cost ~20 ms and ~5 MB of a start (see README, "The appliance's
 * footprint"). The types are prom-client's own; every part of src/ imports prom-client through here.
 */
import type * as PromClient from "prom-client";
import CounterClass from "prom-client/lib/counter.js";
import GaugeClass from "prom-client/lib/gauge.js";
import HistogramClass from "prom-client/lib/histogram.js";
import RegistryClass from "prom-client/lib/registry.js";
import defaultMetrics from "prom-client/lib/defaultMetrics.js";

export const Counter = CounterClass as unknown as typeof PromClient.Counter;
export type Counter<T extends string = string> = PromClient.Counter<T>;
export const Gauge = GaugeClass as unknown as typeof PromClient.Gauge;
export type Gauge<T extends string = string> = PromClient.Gauge<T>;
export const Histogram = HistogramClass as unknown as typeof PromClient.Histogram;
export type Histogram<T extends string = string> = PromClient.Histogram<T>;
export const Registry = RegistryClass as unknown as typeof PromClient.Registry;
export type Registry = PromClient.Registry;
export const collectDefaultMetrics = defaultMetrics as unknown as typeof PromClient.collectDefaultMetrics;
