import * as path from 'node:path';
import { CoordinatorServiceService } from '../../gen/assistant_axis/v1/coordinator';
import { loadConfig } from '../shared/config';
import { DRAIN_SECONDS } from '../shared/defaults';
import { createLogger } from '../shared/logger';
import { createRegistry } from '../shared/metrics';
import { runMain, startService } from '../shared/server';
import { channelCredentials } from '../shared/tls';
import { bearerInterceptor, readToken } from '../shared/auth';
import { lockStateDir } from '../shared/stateLock';
import { watchDependencies } from './dependencies';
import { discoveryFor, parseTarget } from './discovery';
import { Ledger } from './ledger';
import { coordinatorMetrics } from './metrics';
import { COORDINATOR_OPTIONS } from './options';
import { RunManager } from './runManager';
import { coordinatorGrpcHandlers } from './service';
import { AggregationUpstream, InferencePool, JudgePool, Upstreams } from './upstreams';

async function main(): Promise<void> {
  const cfg = loadConfig('coordinator', COORDINATOR_OPTIONS);
  const log = createLogger('coordinator');
  // Each upstream is found the same way: a static list, or a Kubernetes Service's EndpointSlices.
  const discover = (name: 'inference' | 'judge' | 'aggregation') => discoveryFor(parseTarget(name, cfg[name]), { kubeconfig: cfg.kubeconfig, log });
  const discovery = { inference: discover('inference'), judge: discover('judge'), aggregation: discover('aggregation') };
  const credentials = channelCredentials(cfg);
  // Each upstream's certificate is checked against its own Service's name.
  const serverName = (name: string) => cfg['tls-server-name'].replaceAll('{service}', name);
  // Each internal service's own caller token, presented on every call to it (none: it takes any caller the network lets in).
  const dial = (name: 'inference' | 'judge' | 'aggregation') => {
    const file = cfg[`${name}-token-file`];
    return { serverName: serverName(name), token: file ? readToken(file, `--${name}-token-file`) : undefined };
  };
  const upstreams: Upstreams = {
    inference: new InferencePool(log, credentials, dial('inference')),
    judge: new JudgePool(credentials, dial('judge'), log),
    aggregation: new AggregationUpstream('', credentials, dial('aggregation'), log),
  };
  const token = cfg['auth-token-file'] ? readToken(cfg['auth-token-file']) : undefined;
  // One coordinator per state directory: a second one refuses to start, saying who holds it.
  lockStateDir(cfg['state-dir'], 'coordinator');
  const ledger = new Ledger(path.resolve(cfg['state-dir']));
  const dataRoots = cfg['data-roots'].split(',').map((r) => r.trim()).filter(Boolean).map((r) => path.resolve(r));
  const runs = new RunManager(ledger, upstreams, { outputRoot: path.resolve(cfg['output-root']), defaultDataDir: path.resolve(cfg['data-dir']), judgeConcurrency: cfg['judge-concurrency'], batchPollSeconds: cfg['batch-poll-seconds'], dataRoots }, log);
  const registry = createRegistry();
  const metrics = coordinatorMetrics(registry, runs);

  const running = await startService({
    service: 'coordinator',
    host: cfg.host,
    port: cfg.port,
    metricsPort: cfg['metrics-port'],
    bindings: [{ name: 'assistant_axis.v1.CoordinatorService', definition: CoordinatorServiceService, implementation: coordinatorGrpcHandlers(runs, { token, log, inference: upstreams.inference, dataRoots }) }],
    registry,
    log,
    tls: cfg,
    maxReceiveBytes: cfg['max-receive-bytes'],
    interceptors: token ? [bearerInterceptor(token, '/assistant_axis.v1.CoordinatorService/')] : [],
    onDrain: async () => {
      await runs.drain((DRAIN_SECONDS - 2) * 1000);
      for (const d of Object.values(discovery)) d.stop();
      for (const u of [upstreams.inference, upstreams.judge, upstreams.aggregation]) u.close();
      ledger.close();
    },
  });

  await discovery.inference.start((addresses) => upstreams.inference.update(addresses));
  await discovery.judge.start((addresses) => upstreams.judge.update(addresses));
  await discovery.aggregation.start((addresses) => upstreams.aggregation.update(addresses));
  log.info({ inference: discovery.inference.description, judge: discovery.judge.description, aggregation: discovery.aggregation.description }, 'discovery started');
  watchDependencies(upstreams, runs, { ready: (dependency, ok) => metrics.dependenciesReady.set({ dependency }, ok ? 1 : 0), setReady: (ok) => running.setReady(ok) }, log);
}

if (require.main === module) runMain('coordinator', main);
