import * as path from 'node:path';
import { AggregationServiceKeepingBytes } from '../shared/bulkWire';
import { loadConfig } from '../shared/config';
import { callerInterceptors } from '../shared/auth';
import { lockStateDir } from '../shared/stateLock';
import { createLogger } from '../shared/logger';
import { createRegistry } from '../shared/metrics';
import { runMain, startService } from '../shared/server';
import { ColdBucket } from './coldBucket';
import { aggregationMetrics } from './metrics';
import { AGGREGATION_OPTIONS } from './options';
import { aggregationGrpcHandlers, createAggregationService } from './service';
import { DurableStore } from './store';

async function main(): Promise<void> {
  const cfg = loadConfig('aggregation', AGGREGATION_OPTIONS);
  const log = createLogger('aggregation');
  if (!(cfg['cold-cache-mib'] >= 0)) throw new Error(`--cold-cache-mib must be >= 0, got ${cfg['cold-cache-mib']}`);
  ColdBucket.cache.maxBytes = cfg['cold-cache-mib'] * 1024 * 1024;
  if (!(cfg['memory-budget-mib'] > 0)) throw new Error(`--memory-budget-mib must be > 0, got ${cfg['memory-budget-mib']}`);
  if (!(cfg['release-idle-seconds'] >= 0)) throw new Error(`--release-idle-seconds must be >= 0, got ${cfg['release-idle-seconds']}`);
  // One aggregation per state directory: a second one refuses to start, saying who holds it.
  lockStateDir(cfg['state-dir'], 'aggregation');
  const store = new DurableStore(path.resolve(cfg['state-dir']), { memoryBudget: cfg['memory-budget-mib'] * 2 ** 20, idleMs: cfg['release-idle-seconds'] * 1000 });
  const opened = Date.now();
  const { replayed, quarantined } = await store.open();
  for (const q of quarantined) log.error({ segment: q.ref.segment, offset: q.ref.offset, error: q.error, keptIn: q.file }, 'a journal record could not be applied: quarantined, the rest goes on');
  log.info({ stateDir: cfg['state-dir'], replayed, quarantined: quarantined.length, runs: store.runCount(), ms: Date.now() - opened }, 'state loaded: checkpoint and journal replayed');

  const registry = createRegistry();
  const service = createAggregationService({ store, metrics: aggregationMetrics(registry, () => store, () => store.quarantinedCount), log });
  const checkpoint = () => service.checkpoint().catch((err) => log.error({ err }, 'checkpoint failed'));
  const timer = setInterval(() => void checkpoint(), cfg['checkpoint-seconds'] * 1000);
  timer.unref();

  const running = await startService({
    service: 'aggregation',
    host: cfg.host,
    port: cfg.port,
    metricsPort: cfg['metrics-port'],
    // Only the coordinator calls this service: with a caller token, nobody else can.
    interceptors: callerInterceptors(cfg['caller-token-file'], 'assistant_axis.v1.AggregationService'),
    bindings: [{ name: 'assistant_axis.v1.AggregationService', definition: AggregationServiceKeepingBytes, implementation: aggregationGrpcHandlers(service, log) }],
    registry,
    log,
    tls: cfg,
    onDrain: async () => {
      clearInterval(timer);
      await service.checkpoint();
      await store.close();
    },
  });
  running.setReady(true);
}

if (require.main === module) runMain('aggregation', main);
