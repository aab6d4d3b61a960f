import type { Registry } from 'prom-client';
import { prom } from '../shared/metrics';
/** What the gauges read (the durable store; or the accumulators alone, in tests). */
export interface AggregationTotals {
  totalWaiting(): number;
  totalSpooledBytes(): number;
  /** Estimated bytes the runs in memory hold, and the budget (absent: not reported). */
  residentBytes?(): number;
  readonly limits?: { memoryBudget: number };
  runsInMemory?(): number;
}

/** The aggregation service's Prometheus metrics; the gauges read the state when scraped. */
export function aggregationMetrics(registry: Registry, state: () => AggregationTotals, quarantined: () => number = () => 0) {
  const registers = [registry];
  new prom.Gauge({
    name: 'axis_aggregation_memory_bytes',
    help: 'Estimated bytes the runs in memory hold (sums in RAM, item keys, waiting entries), against axis_aggregation_memory_budget_bytes',
    registers,
    collect() {
      this.set(state().residentBytes?.() ?? 0);
    },
  });
  new prom.Gauge({
    name: 'axis_aggregation_memory_budget_bytes',
    help: 'The memory budget runs are checked against (--memory-budget-mib)',
    registers,
    collect() {
      this.set(state().limits?.memoryBudget ?? 0);
    },
  });
  new prom.Gauge({
    name: 'axis_aggregation_runs_in_memory',
    help: 'Runs whose state is in memory (the others are on disk, read back when asked for)',
    registers,
    collect() {
      this.set(state().runsInMemory?.() ?? 0);
    },
  });
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
