import { JudgeServiceService as JudgeServiceDefinition } from '../../gen/assistant_axis/v1/judge';
import { loadConfig } from '../shared/config';
import { callerInterceptors } from '../shared/auth';
import { createLogger } from '../shared/logger';
import { createRegistry } from '../shared/metrics';
import { runMain, startService } from '../shared/server';
import { loadPrices } from './costs';
import { judgeMetrics } from './metrics';
import { JUDGE_OPTIONS } from './options';
import { createProvider } from './providers';
import { createJudgeService, judgeGrpcHandlers } from './service';

async function main(): Promise<void> {
  const cfg = loadConfig('judge', JUDGE_OPTIONS);
  const log = createLogger('judge');
  const registry = createRegistry();
  const service = createJudgeService({
    provider: createProvider(cfg),
    prices: loadPrices(cfg.prices),
    concurrency: cfg.concurrency,
    requestsPerSecond: cfg['requests-per-second'],
    tokensPerMinute: cfg['tokens-per-minute'],
    retry: { maxAttempts: Math.max(1, cfg['max-attempts']), baseDelayMs: cfg['backoff-ms'], maxDelayMs: cfg['max-backoff-ms'], maxRetryAfterMs: cfg['max-retry-after-ms'] },
    unparsedRetries: Math.max(0, cfg['unparsed-retries']),
    metrics: judgeMetrics(registry),
    log,
  });
  const running = await startService({
    service: 'judge',
    host: cfg.host,
    port: cfg.port,
    metricsPort: cfg['metrics-port'],
    // Only the coordinator calls this service: with a caller token, nobody else can.
    interceptors: callerInterceptors(cfg['caller-token-file'], 'assistant_axis.v1.JudgeService'),
    bindings: [{ name: 'assistant_axis.v1.JudgeService', definition: JudgeServiceDefinition, implementation: judgeGrpcHandlers(service, log) }],
    registry,
    log,
    tls: cfg,
  });
  const { info } = service;
  log.info({ provider: info.provider, model: info.model, baseUrl: info.baseUrl, concurrency: info.concurrency, requestsPerSecond: info.requestsPerSecond, hasPrice: info.hasPrice }, 'judge ready');
  running.setReady(true);
}

if (require.main === module) runMain('judge', main);
