import type { Registry } from 'prom-client';
import { prom } from '../shared/metrics';
import type { Accumulators } from './accumulator';

/** The aggregation service's Prometheus metrics; the gauges read the state when scraped. */
export function aggregationMetrics(registry: Registry, state: () => Accumulators, quarantined: () => number = () => 0) {
  const registers = [registry];
  new prom.Gauge({
    name: 'axis_aggregation_quarantined_records',
    help: 'Journal records that could not be applied when the service started, set aside (their bytes under <state-dir>/quarantine)',
    registers,
    collect() {
      this.set(quarantined());
    },
  });
  let lastCheckpoint = Date.now();
  new prom.Gauge({
    name: 'axis_aggregation_waiting_items',
    help: 'Activations or scores waiting for their other half, all runs',
    registers,
    collect() {
      this.set(state().totalWaiting());
    },
  });
  new prom.Gauge({
    name: 'axis_aggregation_spool_bytes',
    help: 'Bytes of activations spooled on disk waiting for their score, all runs',
    registers,
    collect() {
      this.set(state().totalSpooledBytes());
    },
  });
  new prom.Gauge({
    name: 'axis_aggregation_checkpoint_age_seconds',
    help: 'Seconds since the last checkpoint: how much journal a restart would replay',
    registers,
    collect() {
      this.set((Date.now() - lastCheckpoint) / 1000);
    },
  });
  return {
    messages: new prom.Counter({ name: 'axis_aggregation_messages_total', help: 'Ingested messages, by kind and outcome (folded, waiting, duplicate, invalid)', labelNames: ['kind', 'outcome'], registers }),
    checkpoints: new prom.Counter({ name: 'axis_aggregation_checkpoints_total', help: 'Checkpoints written', registers }),
    checkpointSeconds: new prom.Histogram({ name: 'axis_aggregation_checkpoint_seconds', help: 'Time to write a checkpoint', buckets: [0.01, 0.05, 0.1, 0.5, 1, 5, 30], registers }),
    checkpointWritten(): void {
      lastCheckpoint = Date.now();
    },
  };
}

export type AggregationMetrics = ReturnType<typeof aggregationMetrics>;
