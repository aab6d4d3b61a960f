import * as grpc from '@grpc/grpc-js';
import { ChatMessage, DType } from '../../gen/assistant_axis/v1/common';
import {
  ExtractRequest, ExtractResult, GenerateRequest, GenerateResult, InferenceServer,
} from '../../gen/assistant_axis/v1/inference';
import { Config, loadConfig, OptionTable } from '../shared/config';
import { InferenceServiceBulk } from '../shared/bulkWire';
import { TLS_OPTIONS } from '../shared/tls';
import { DEFAULT_METRICS_PORTS, DEFAULT_PORTS } from '../shared/defaults';
import { Limiter } from '../shared/limit';
import { createLogger } from '../shared/logger';
import { createRegistry, prom } from '../shared/metrics';
import { RpcError, serveBidi, unary } from '../shared/rpc';
import { runMain, startService } from '../shared/server';
import { encodeTensor } from '../shared/tensor';
import type { InferenceBackend } from './backend';
import { OnnxBackend } from './onnx/backend';
import type { BatchStats } from './onnx/engine';
import { SyntheticBackend } from './synthetic';
import { validateExtract, validateGenerate } from './validate';

export const INFERENCE_OPTIONS = {
  host: { type: 'string', env: 'AXIS_HOST', default: '127.0.0.1', help: 'address to listen on' },
  port: { type: 'number', env: 'AXIS_INFERENCE_PORT', default: DEFAULT_PORTS.inference, help: 'gRPC port' },
  'metrics-port': { type: 'number', env: 'AXIS_INFERENCE_METRICS_PORT', default: DEFAULT_METRICS_PORTS.inference, help: 'Prometheus metrics port' },
  backend: { type: 'string', env: 'AXIS_INFERENCE_BACKEND', default: 'synthetic', help: 'model backend: onnx (a model directory) or synthetic (no model; for plumbing, load and fault tests)' },
  'model-dir': { type: 'string', env: 'AXIS_MODEL_DIR', default: '', help: 'onnx backend: model directory made by `axis-model build`, or the stages of a split model (`--layers` builds), comma-separated in layer order' },
  device: { type: 'string', env: 'AXIS_DEVICE', default: 'cpu', help: 'onnx backend: cpu, cuda (GPU 0, or GPU k for stage k), auto (CUDA when it loads, else CPU, with a warning), or one cpu/cuda:N per stage, comma-separated' },
  decode: { type: 'string', env: 'AXIS_DECODE', default: 'auto', help: 'onnx backend: loop (the generation graph: one run per batch, the KV cache stays on the device), host (one run per token; split models) or auto (loop when the model has it)' },
  'max-batch': { type: 'number', env: 'AXIS_MAX_BATCH', default: 16, help: 'onnx backend: most sequences in one batch' },
  'max-batch-tokens': { type: 'number', env: 'AXIS_MAX_BATCH_TOKENS', default: 16384, help: 'onnx backend: most padded prompt tokens in one batch (sequences x longest prompt)' },
  'batch-gather-ms': { type: 'number', env: 'AXIS_BATCH_GATHER_MS', default: 20, help: 'onnx backend: how long an idle engine waits for a batch to fill' },
  model: { type: 'string', env: 'AXIS_MODEL', default: '', help: 'model name reported to runs (empty: the model directory\'s name; synthetic-tiny for the synthetic backend)' },
  'synthetic-layers': { type: 'number', env: 'AXIS_SYNTHETIC_LAYERS', default: 8, help: 'synthetic backend: layers' },
  'synthetic-hidden': { type: 'number', env: 'AXIS_SYNTHETIC_HIDDEN', default: 64, help: 'synthetic backend: hidden size' },
  'synthetic-tokens-per-second': { type: 'number', env: 'AXIS_SYNTHETIC_TOKENS_PER_SECOND', default: 0, help: 'synthetic backend: words per second per item (0 = no delay)' },
  'synthetic-items-per-second': { type: 'number', env: 'AXIS_SYNTHETIC_ITEMS_PER_SECOND', default: 0, help: 'synthetic backend: items answered per second by the replica, whatever the concurrency (0 = no limit; rehearsals of a GPU node\'s pace)' },
  'synthetic-system-prompt': { type: 'boolean', env: 'AXIS_SYNTHETIC_SYSTEM_PROMPT', default: true, help: 'synthetic backend: whether its chat template renders a system message' },
  capacity: { type: 'number', env: 'AXIS_INFERENCE_CAPACITY', default: 0, help: 'items accepted at once (0: the backend\'s default: twice --max-batch for onnx, so the next batch is ready when one ends; 16 for synthetic)' },
  'activation-dtype': { type: 'string', env: 'AXIS_ACTIVATION_DTYPE', default: 'f32', help: 'wire dtype of activations: f32, f16 or bf16' },
  ...TLS_OPTIONS,
} satisfies OptionTable;

const WIRE_DTYPES: Record<string, DType> = { f32: DType.DTYPE_F32, f16: DType.DTYPE_F16, bf16: DType.DTYPE_BF16 };

export function createBackend(cfg: Config<typeof INFERENCE_OPTIONS>, hooks: { onBatch?: (s: BatchStats) => void; warn?: (msg: string) => void } = {}): InferenceBackend {
  if (cfg.backend === 'synthetic') {
    return new SyntheticBackend({
      model: cfg.model || 'synthetic-tiny',
      numLayers: cfg['synthetic-layers'],
      hidden: cfg['synthetic-hidden'],
      tokensPerSecond: cfg['synthetic-tokens-per-second'],
      itemsPerSecond: cfg['synthetic-items-per-second'],
      capacity: cfg.capacity || 16,
      supportsSystemPrompt: cfg['synthetic-system-prompt'],
    });
  }
  if (cfg.backend === 'onnx') {
    if (!cfg['model-dir']) throw new Error('--model-dir is required with --backend onnx');
    if (!['auto', 'loop', 'host'].includes(cfg.decode)) throw new Error(`--decode must be auto, loop or host, got ${cfg.decode}`);
    if (!(Number.isInteger(cfg['max-batch']) && cfg['max-batch'] >= 1)) throw new Error(`--max-batch must be a whole number >= 1, got ${cfg['max-batch']}`);
    if (!(cfg['max-batch-tokens'] >= 1)) throw new Error(`--max-batch-tokens must be >= 1, got ${cfg['max-batch-tokens']}`);
    if (!(cfg['batch-gather-ms'] >= 0)) throw new Error(`--batch-gather-ms must be >= 0, got ${cfg['batch-gather-ms']}`);
    return new OnnxBackend({
      modelDirs: cfg['model-dir'].split(',').map((d) => d.trim()).filter(Boolean),
      model: cfg.model,
      capacity: cfg.capacity || 2 * cfg['max-batch'],
      device: cfg.device,
      decode: cfg.decode as 'auto' | 'loop' | 'host',
      maxBatch: cfg['max-batch'],
      maxBatchTokens: cfg['max-batch-tokens'],
      gatherMs: cfg['batch-gather-ms'],
      ...hooks,
    });
  }
  throw new Error(`--backend: unknown backend ${JSON.stringify(cfg.backend)} (known: onnx, synthetic)`);
}

async function main(): Promise<void> {
  const cfg = loadConfig('inference', INFERENCE_OPTIONS);
  const log = createLogger('inference');
  const wireDtype = WIRE_DTYPES[cfg['activation-dtype']];
  if (wireDtype === undefined) throw new Error(`--activation-dtype must be f32, f16 or bf16, got ${cfg['activation-dtype']}`);
  if (!(cfg.capacity >= 0)) throw new Error('--capacity must be at least 1 (or 0 for the backend default)');
  const registry = createRegistry('inference');
  const batchSizes = new prom.Histogram({ name: 'axis_inference_batch_sequences', help: 'Sequences per batch run', buckets: [1, 2, 4, 8, 16, 32, 64, 128], registers: [registry] });
  const batchSeconds = new prom.Histogram({ name: 'axis_inference_batch_seconds', help: 'Time to run one batch to its end', buckets: [0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300], registers: [registry] });
  const backend = createBackend(cfg, {
    onBatch: (b) => {
      batchSizes.observe(b.size);
      batchSeconds.observe(b.seconds);
    },
    warn: (msg) => log.warn(msg),
  });
  let loadError: string | undefined;

  const items = new prom.Counter({ name: 'axis_inference_items_total', help: 'Items answered, by RPC and outcome', labelNames: ['rpc', 'outcome'], registers: [registry] });
  const tokens = new prom.Counter({ name: 'axis_inference_tokens_total', help: 'Tokens processed, by kind', labelNames: ['kind'], registers: [registry] });
  let inFlightCount = 0;
  new prom.Gauge({
    name: 'axis_inference_in_flight',
    help: 'Items received and not yet answered (running + waiting)',
    registers: [registry],
    collect() {
      this.set(inFlightCount);
    },
  });
  // The families users know from vLLM: running and waiting requests, latency, time to first token, batch size.
  new prom.Gauge({
    name: 'axis_inference_requests_running',
    help: 'Items being generated or prefilled now',
    registers: [registry],
    collect() {
      this.set(limiter.running);
    },
  });
  new prom.Gauge({
    name: 'axis_inference_requests_waiting',
    help: 'Items received and waiting for a free slot',
    registers: [registry],
    collect() {
      this.set(Math.max(0, inFlightCount - limiter.running));
    },
  });
  const seconds = new prom.Histogram({ name: 'axis_inference_e2e_request_latency_seconds', help: 'Time from an item\'s arrival to its answer', labelNames: ['rpc'], buckets: [0.001, 0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300], registers: [registry] });
  const firstToken = new prom.Histogram({ name: 'axis_inference_time_to_first_token_seconds', help: 'Time from the start of an item\'s generation to its first token', buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30], registers: [registry] });
  new prom.Gauge({
    name: 'axis_inference_batch_size',
    help: 'Sequences in the batch running now (0 when idle); the synthetic backend runs each item alone',
    registers: [registry],
    collect() {
      this.set(backend instanceof OnnxBackend ? (backend.batchEngine?.currentBatch ?? 0) : Math.min(1, limiter.running));
    },
  });
  const modelInfo = new prom.Gauge({ name: 'axis_inference_model_info', help: 'The loaded model (value 1)', labelNames: ['model', 'backend', 'device', 'architecture', 'decode'], registers: [registry] });
  const provider = new prom.Gauge({ name: 'axis_inference_execution_provider', help: 'The onnxruntime execution provider each stage runs on (value 1)', labelNames: ['provider', 'device'], registers: [registry] });

  const limiter = new Limiter(backend.info.capacity);

  /** Serves one bidi stream: each request runs under the capacity limit, with metrics; failures become the item's error. */
  function serveStream<Req extends { itemId: string }, Res>(
    rpc: string,
    call: grpc.ServerDuplexStream<Req, Res>,
    handle: (req: Req) => Promise<Res>,
    failed: (itemId: string, code: grpc.status, message: string) => Res,
  ): void {
    serveBidi(call, async (req: Req) => {
      inFlightCount++;
      const timer = seconds.startTimer({ rpc });
      try {
        const res = await limiter.run(() => handle(req));
        items.inc({ rpc, outcome: 'ok' });
        return res;
      } catch (err) {
        const code = typeof (err as { code?: unknown })?.code === 'number' ? ((err as { code: number }).code as grpc.status) : grpc.status.INTERNAL;
        items.inc({ rpc, outcome: grpc.status[code] ?? 'error' });
        if (code === grpc.status.INTERNAL) log.error({ err, itemId: req.itemId }, `${rpc} failed`);
        return failed(req.itemId, code, (err as Error).message);
      } finally {
        timer();
        inFlightCount--;
      }
    });
  }

  /** The model's info once loaded; until then every call says why the model is not there. */
  const loadedInfo = () => {
    if (!ready) throw new RpcError(grpc.status.FAILED_PRECONDITION, loadError ? `model not loaded: ${loadError}` : 'model still loading');
    return backend.info;
  };
  let ready = false;

  const impl: InferenceServer = {
    getModelInfo: unary(log, async () => loadedInfo()),
    generate: (call) =>
      serveStream<GenerateRequest, GenerateResult>(
        'Generate',
        call,
        async (req) => {
          const input = validateGenerate(req, loadedInfo());
          const out = await backend.generate(input);
          if (out.timeToFirstTokenSeconds !== undefined) firstToken.observe(out.timeToFirstTokenSeconds);
          tokens.inc({ kind: 'prompt' }, out.promptTokens);
          tokens.inc({ kind: 'completion' }, out.completionTokens);
          return {
            itemId: req.itemId,
            text: out.text,
            promptTokens: out.promptTokens,
            completionTokens: out.completionTokens,
            finishReason: out.finishReason,
            activation: encodeTensor(out.activation, wireDtype),
            error: undefined,
            responseTokenIds: out.responseIds ?? [],
          };
        },
        (itemId, code, message) => ({ itemId, text: '', promptTokens: 0, completionTokens: 0, finishReason: '', activation: undefined, error: { code, message }, responseTokenIds: [] }),
      ),
    extract: (call) =>
      serveStream<ExtractRequest, ExtractResult>(
        'Extract',
        call,
        async (req) => {
          const { messages, layers, opts } = validateExtract(req, loadedInfo());
          const out = await backend.extract(messages as ChatMessage[], layers, opts);
          tokens.inc({ kind: 'prefill' }, out.responseTokens);
          return { itemId: req.itemId, responseTokens: out.responseTokens, activation: encodeTensor(out.activation, wireDtype), error: undefined };
        },
        (itemId, code, message) => ({ itemId, responseTokens: 0, activation: undefined, error: { code, message } }),
      ),
  };

  const running = await startService({
    service: 'inference',
    host: cfg.host,
    port: cfg.port,
    metricsPort: cfg['metrics-port'],
    bindings: [{ name: 'assistant_axis.v1.Inference', definition: InferenceServiceBulk, implementation: impl }],
    registry,
    log,
    tls: cfg,
    onDrain: async () => {
      // Let open streams finish what they hold; the server's drain timer bounds the wait.
      await new Promise<void>((resolve) => {
        const check = () => (limiter.running === 0 ? resolve() : setTimeout(check, 50));
        check();
      });
      await backend.close();
    },
  });
  try {
    await backend.load();
  } catch (err) {
    // Stay up and not ready: the health check says NOT_SERVING, GetModelInfo and the logs say why.
    loadError = (err as Error).message;
    log.error({ reason: loadError }, 'model failed to load; the service stays not ready');
    return;
  }
  const info = backend.info;
  const decode = backend instanceof OnnxBackend ? backend.runnerKind : 'synthetic';
  modelInfo.set({ model: info.model, backend: info.backend, device: info.device, architecture: info.architecture, decode }, 1);
  for (const d of info.device.split(',')) provider.set({ provider: d.startsWith('cuda') ? 'CUDAExecutionProvider' : d === 'cpu' ? 'CPUExecutionProvider' : 'none', device: d }, 1);
  log.info({ model: info.model, backend: info.backend, device: info.device, decode, layers: info.numLayers, hidden: info.hiddenSize, capacity: info.capacity, systemPrompt: info.supportsSystemPrompt, hashes: info.hashes }, 'model loaded');
  ready = true;
  running.setReady(true);
}

if (require.main === module) runMain('inference', main);
