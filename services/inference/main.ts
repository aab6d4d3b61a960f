import { Dtype } from '../../gen/assistant_axis/v1/common';
import { InferenceServiceBulk } from '../shared/bulkWire';
import { loadConfig } from '../shared/config';
import { callerInterceptors, readToken } from '../shared/auth';
import { createLogger } from '../shared/logger';
import { createRegistry } from '../shared/metrics';
import { runMain, startService } from '../shared/server';
import { createBackend } from './backends';
import type { HostDraws } from './onnx';
import { ChatServer } from './chatServer';
import { chatMetrics, inferenceMetrics, monitorMetrics } from './metrics';
import { ProjectionMonitor } from './monitor';
import { INFERENCE_OPTIONS } from './options';
import { createInferenceService, inferenceGrpcHandlers, InferenceService } from './service';

const WIRE_DTYPES: Record<string, Dtype> = { f32: Dtype.DTYPE_F32, f16: Dtype.DTYPE_F16, bf16: Dtype.DTYPE_BF16 };

async function main(): Promise<void> {
  const cfg = loadConfig('inference', INFERENCE_OPTIONS);
  const log = createLogger('inference');
  const wireDtype = WIRE_DTYPES[cfg['activation-dtype']];
  if (wireDtype === undefined) throw new Error(`--activation-dtype must be f32, f16 or bf16, got ${cfg['activation-dtype']}`);
  if (!(cfg.capacity >= 0)) throw new Error('--capacity must be at least 1 (or 0 for the backend default)');
  // The chat endpoint's token, read before anything starts: a missing file is a configuration error.
  let chatToken: string | undefined;
  if (cfg['chat-port']) {
    if (!cfg['chat-token-file']) throw new Error('--chat-port needs --chat-token-file: the chat endpoint requires a bearer token');
    chatToken = readToken(cfg['chat-token-file'], '--chat-token-file');
  }
  const registry = createRegistry();
  let service: InferenceService | undefined;
  const metrics = inferenceMetrics(registry, {
    inFlight: () => service?.inFlight ?? 0,
    running: () => service?.running ?? 0,
    batchSize: () => backend.currentBatchSize() ?? Math.min(1, service?.running ?? 0),
  });
  const countDraws = (d?: HostDraws) => {
    if (d?.candidates) metrics.hostDraws.inc({ source: 'candidates' }, d.candidates);
    if (d?.vocabulary) metrics.hostDraws.inc({ source: 'vocabulary' }, d.vocabulary);
  };
  const backend = createBackend(cfg, {
    onBatch: (b) => {
      metrics.batchSizes.observe(b.size);
      metrics.batchSeconds.observe(b.seconds);
    },
    onStep: (s) => {
      metrics.stepTokens.observe(s.active);
      metrics.stepSeconds.observe(s.seconds);
      countDraws(s.drawn);
    },
    onGenerator: (outcome) => metrics.generatorRequests.inc({ outcome }),
    onPrefill: (p) => {
      metrics.prefixCacheQueries.inc(p.tokens);
      metrics.prefixCacheHits.inc(p.reused);
      metrics.prompts.inc({ run: p.joined ? 'joined' : 'alone' });
      countDraws(p.drawn);
    },
    warn: (msg) => log.warn(msg),
    info: (msg) => log.info(msg),
  });
  const threshold = cfg['monitor-threshold'] === '' ? undefined : Number(cfg['monitor-threshold']);
  if (threshold !== undefined && !Number.isFinite(threshold)) throw new Error(`--monitor-threshold must be a number, got ${JSON.stringify(cfg['monitor-threshold'])}`);
  let observe: ((value: number) => void) | undefined;
  let monitor: ProjectionMonitor | undefined;
  service = createInferenceService({
    backend,
    wireDtype,
    metrics,
    log,
    afterLoad: (info) => {
      // Every series of this replica names its model, as vLLM's do (dashboards join on it).
      registry.setDefaultLabels({ model_name: info.model });
      const chatDefault = cfg['chat-capping-experiment'];
      if (cfg['chat-port'] && chatDefault && chatDefault !== 'none' && !info.capping?.experiments.includes(chatDefault)) {
        throw new Error(`--chat-capping-experiment ${JSON.stringify(chatDefault)} is not an experiment of ${info.capping ? `${info.capping.file} (it has ${info.capping.experiments.join(', ')})` : 'a capping config (give --capping-config)'}`);
      }
      if (!cfg['monitor-axis']) return;
      monitor = ProjectionMonitor.load(cfg['monitor-axis'], info, threshold);
      observe = monitorMetrics(registry, info.model, monitor.buckets, monitor.threshold);
      log.info({ axis: monitor.file, layer: monitor.layer, threshold: monitor.threshold ?? null }, monitor.threshold === undefined ? 'monitoring answers on the axis (no threshold: give --monitor-threshold for the share below it)' : 'monitoring answers on the axis');
    },
    onActivation: (activation, layers) => {
      const p = monitor?.project(activation, layers);
      if (p !== undefined) observe!(p);
    },
  });
  const running = await startService({
    service: 'inference',
    host: cfg.host,
    port: cfg.port,
    metricsPort: cfg['metrics-port'],
    // Only the coordinator calls this service: with a caller token, nobody else can.
    interceptors: callerInterceptors(cfg['caller-token-file'], 'assistant_axis.v1.InferenceService'),
    bindings: [{ name: 'assistant_axis.v1.InferenceService', definition: InferenceServiceBulk, implementation: inferenceGrpcHandlers(service, log) }],
    registry,
    log,
    tls: cfg,
    onDrain: async () => {
      // Let open streams finish what they hold; the server's drain timer bounds the wait.
      await new Promise<void>((resolve) => {
        const check = () => (service!.running === 0 ? resolve() : setTimeout(check, 50));
        check();
      });
      await backend.close();
    },
  });
  const loaded = await service.load();
  if (loaded) running.setReady(true);
  if (cfg['chat-port']) {
    // Not loaded: the endpoint answers every request 503 with the reason.
    const countChat = loaded ? chatMetrics(registry, service.modelInfo().model) : undefined;
    const chat = await ChatServer.start(service, { host: cfg.host, port: cfg['chat-port'], token: chatToken!, defaultExperiment: cfg['chat-capping-experiment'], monitor: () => monitor, onAnswer: (capped) => countChat?.(capped) }, log);
    process.once('SIGTERM', () => void chat.close());
  }
}

if (require.main === module) runMain('inference', main);
