import type { Registry } from 'prom-client';
import { prom } from '../shared/metrics';
import type { RunManager } from './runManager';

/**
 * The coordinator's Prometheus metrics, read from the runs when scraped: each executing run's
 * items by stage, time left and whether it waits for judge batches (an ended run leaves these
 * series), and the ledger's runs by state.
 */
export function coordinatorMetrics(registry: Registry, runs: RunManager) {
  const registers = [registry];
  new prom.Gauge({
    name: 'axis_coordinator_run_items',
    help: 'Items of each run executing here, by stage (total, generated, judged, aggregated)',
    labelNames: ['run', 'stage'],
    registers,
    collect() {
      this.reset();
      for (const name of runs.executingRuns()) {
        const p = runs.progressOf(name);
        if (!p) continue;
        this.set({ run: name, stage: 'total' }, p.itemsTotal);
        this.set({ run: name, stage: 'generated' }, p.generated);
        this.set({ run: name, stage: 'judged' }, p.judged);
        this.set({ run: name, stage: 'aggregated' }, p.aggregated);
      }
    },
  });
  new prom.Gauge({
    name: 'axis_coordinator_run_eta_seconds',
    help: 'Estimated seconds left of each run executing here',
    labelNames: ['run'],
    registers,
    collect() {
      this.reset();
      for (const name of runs.executingRuns()) this.set({ run: name }, runs.progressOf(name)?.etaSeconds ?? 0);
    },
  });
  new prom.Gauge({
    name: 'axis_coordinator_run_waiting_for_judge_batches',
    help: 'Whether each run executing here is in its judge batches (1), waiting on the Batch API, or not (0)',
    labelNames: ['run'],
    registers,
    collect() {
      this.reset();
      for (const name of runs.executingRuns()) this.set({ run: name }, runs.waitingForJudgeBatches(name) ? 1 : 0);
    },
  });
  new prom.Gauge({
    name: 'axis_coordinator_runs',
    help: 'Runs in the ledger, by state (RUNNING, PAUSED, SUCCEEDED, FAILED, CANCELLED)',
    labelNames: ['state'],
    registers,
    collect() {
      this.reset();
      for (const [state, count] of runs.runsByState()) this.set({ state }, count);
    },
  });
  return {
    dependenciesReady: new prom.Gauge({ name: 'axis_coordinator_dependencies_ready', help: 'Whether each dependency answers (1) or not (0)', labelNames: ['dependency'], registers }),
  };
}
