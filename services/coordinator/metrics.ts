import type { Registry } from 'prom-client';
import { prom } from '../shared/metrics';
import type { RunManager } from './runManager';

/** The coordinator's Prometheus metrics: each run's items by stage and time left, read from the runs when scraped. */
export function coordinatorMetrics(registry: Registry, runs: RunManager) {
  const registers = [registry];
  new prom.Gauge({
    name: 'axis_coordinator_run_items',
    help: 'Items of each run this coordinator has run since it started, by stage (total, generated, judged, aggregated)',
    labelNames: ['run', 'stage'],
    registers,
    collect() {
      this.reset();
      for (const name of runs.observedRuns()) {
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
    help: 'Estimated seconds left of each run (0 once it has ended)',
    labelNames: ['run'],
    registers,
    collect() {
      this.reset();
      for (const name of runs.observedRuns()) this.set({ run: name }, runs.isTerminal(name) ? 0 : (runs.progressOf(name)?.etaSeconds ?? 0));
    },
  });
  return {
    dependenciesReady: new prom.Gauge({ name: 'axis_coordinator_dependencies_ready', help: 'Whether each dependency answers (1) or not (0)', labelNames: ['dependency'], registers }),
  };
}
