import * as grpc from '@grpc/grpc-js';
import { ChatMessage, DType } from '../../gen/assistant_axis/v1/common';
import {
  ExtractRequest, ExtractResult, GenerateRequest, GenerateResult, InferenceServer, InferenceService,
} from '../../gen/assistant_axis/v1/inference';
import { Config, loadConfig, OptionTable } from '../shared/config';
import { DEFAULT_METRICS_PORTS, DEFAULT_PORTS } from '../shared/defaults';
import { Limiter } from '../shared/limit';
import { createLogger } from '../shared/logger';
import { createRegistry, prom } from '../shared/metrics';
import { RpcError, serveBidi, unary } from '../shared/rpc';
import { runMain, startService } from '../shared/server';
import { encodeTensor } from '../shared/tensor';
import type { InferenceBackend } from './backend';
import { OnnxBackend } from './onnx/backend';
import { SyntheticBackend } from './synthetic';
import { validateExtract, validateGenerate } from './validate';

export const INFERENCE_OPTIONS = {
  host: { type: 'string', env: 'AXIS_HOST', default: '127.0.0.1', help: 'address to listen on' },
  port: { type: 'number', env: 'AXIS_INFERENCE_PORT', default: DEFAULT_PORTS.inference, help: 'gRPC port' },
  'metrics-port': { type: 'number', env: 'AXIS_INFERENCE_METRICS_PORT', default: DEFAULT_METRICS_PORTS.inference, help: 'Prometheus metrics port' },
  backend: { type: 'string', env: 'AXIS_INFERENCE_BACKEND', default: 'synthetic', help: 'model backend: onnx (a model directory) or synthetic (no model; for plumbing, load and fault tests)' },
  'model-dir': { type: 'string', env: 'AXIS_MODEL_DIR', default: '', help: 'onnx backend: model directory made by `axis-model build`' },
  model: { type: 'string', env: 'AXIS_MODEL', default: '', help: 'model name reported to runs (empty: the model directory\'s name; synthetic-tiny for the synthetic backend)' },
  'synthetic-layers': { type: 'number', env: 'AXIS_SYNTHETIC_LAYERS', default: 8, help: 'synthetic backend: layers' },
  'synthetic-hidden': { type: 'number', env: 'AXIS_SYNTHETIC_HIDDEN', default: 64, help: 'synthetic backend: hidden size' },
  'synthetic-tokens-per-second': { type: 'number', env: 'AXIS_SYNTHETIC_TOKENS_PER_SECOND', default: 0, help: 'synthetic backend: words per second per item (0 = no delay)' },
  'synthetic-system-prompt': { type: 'boolean', env: 'AXIS_SYNTHETIC_SYSTEM_PROMPT', default: true, help: 'synthetic backend: whether its chat template renders a system message' },
  capacity: { type: 'number', env: 'AXIS_INFERENCE_CAPACITY', default: 0, help: 'items processed at once (0: the backend\'s default, 2 for onnx, 16 for synthetic)' },
  'activation-dtype': { type: 'string', env: 'AXIS_ACTIVATION_DTYPE', default: 'f32', help: 'wire dtype of activations: f32, f16 or bf16' },
} satisfies OptionTable;

const WIRE_DTYPES: Record<string, DType> = { f32: DType.DTYPE_F32, f16: DType.DTYPE_F16, bf16: DType.DTYPE_BF16 };

export function createBackend(cfg: Config<typeof INFERENCE_OPTIONS>): InferenceBackend {
  if (cfg.backend === 'synthetic') {
    return new SyntheticBackend({
      model: cfg.model || 'synthetic-tiny',
      numLayers: cfg['synthetic-layers'],
      hidden: cfg['synthetic-hidden'],
      tokensPerSecond: cfg['synthetic-tokens-per-second'],
      capacity: cfg.capacity || 16,
      supportsSystemPrompt: cfg['synthetic-system-prompt'],
    });
  }
  if (cfg.backend === 'onnx') {
    if (!cfg['model-dir']) throw new Error('--model-dir is required with --backend onnx');
    return new OnnxBackend({ modelDir: cfg['model-dir'], model: cfg.model, capacity: cfg.capacity || 2 });
  }
  throw new Error(`--backend: unknown backend ${JSON.stringify(cfg.backend)} (known: onnx, synthetic)`);
}

async function main(): Promise<void> {
  const cfg = loadConfig('inference', INFERENCE_OPTIONS);
  const log = createLogger('inference');
  const wireDtype = WIRE_DTYPES[cfg['activation-dtype']];
  if (wireDtype === undefined) throw new Error(`--activation-dtype must be f32, f16 or bf16, got ${cfg['activation-dtype']}`);
  if (!(cfg.capacity >= 0)) throw new Error('--capacity must be at least 1 (or 0 for the backend default)');
  const backend = createBackend(cfg);
  let loadError: string | undefined;

  const registry = createRegistry('inference');
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
    help: 'Sequences per forward pass (this engine runs one sequence per pass; capacity sets how many run side by side)',
    registers: [registry],
    collect() {
      this.set(limiter.running > 0 ? 1 : 0);
    },
  });
  const modelInfo = new prom.Gauge({ name: 'axis_inference_model_info', help: 'The loaded model (value 1)', labelNames: ['model', 'backend', 'device', 'architecture'], registers: [registry] });

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
          };
        },
        (itemId, code, message) => ({ itemId, text: '', promptTokens: 0, completionTokens: 0, finishReason: '', activation: undefined, error: { code, message } }),
      ),
    extract: (call) =>
      serveStream<ExtractRequest, ExtractResult>(
        'Extract',
        call,
        async (req) => {
          const { messages, layers } = validateExtract(req, loadedInfo());
          const out = await backend.extract(messages as ChatMessage[], layers);
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
    bindings: [{ name: 'assistant_axis.v1.Inference', definition: InferenceService, implementation: impl }],
    registry,
    log,
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
  modelInfo.set({ model: info.model, backend: info.backend, device: info.device, architecture: info.architecture }, 1);
  log.info({ model: info.model, backend: info.backend, device: info.device, layers: info.numLayers, hidden: info.hiddenSize, capacity: info.capacity, systemPrompt: info.supportsSystemPrompt, hashes: info.hashes }, 'model loaded');
  ready = true;
  running.setReady(true);
}

if (require.main === module) runMain('inference', main);
