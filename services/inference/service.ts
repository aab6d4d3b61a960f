import * as grpc from '@grpc/grpc-js';
import type { ChatMessage, Dtype } from '../../gen/assistant_axis/v1/common';
import type { ExtractRequest, ExtractResponse, GenerateRequest, GenerateResponse, InferenceServiceServer, GetModelInfoResponse, ProjectConversationRequest, ProjectConversationResponse } from '../../gen/assistant_axis/v1/inference';
import { Limiter } from '../shared/limit';
import type { Logger } from '../shared/logger';
import { RpcError, serveBidi, unary } from '../shared/rpc';
import { encodeTensor, FloatTensor } from '../shared/tensor';
import type { InferenceBackend } from './backend';
import type { InferenceMetrics } from './metrics';
import { validateExtract, validateGenerate, validateProject } from './validate';

/** The inference service's RPCs as plain functions: what the gRPC adapter serves and what tests call without a network. */
export interface InferenceService {
  /** The model's info once loaded; until then FAILED_PRECONDITION saying why the model is not there. */
  modelInfo(): GetModelInfoResponse;
  /**
   * One item, under the capacity limit; a failure becomes the item's error (the stream goes on).
   * `stream.onText`: the answer as it grows (streaming), in pieces that add up to its text;
   * `stream.onText` returning true ends the answer there; `stream.lane`: who asks (the chat endpoint says chat).
   */
  generate(req: GenerateRequest, cancelled?: AbortSignal, stream?: { onText?: (delta: string) => boolean | void; lane?: 'run' | 'chat' }): Promise<GenerateResponse>;
  extract(req: ExtractRequest, cancelled?: AbortSignal): Promise<ExtractResponse>;
  /** A conversation's assistant turns on an axis; bad input and failures are the call's status. */
  projectConversation(req: ProjectConversationRequest, cancelled?: AbortSignal): Promise<ProjectConversationResponse>;
  /** Loads the model; false (and every call says why) when it cannot. */
  load(): Promise<boolean>;
  /** Items received and not yet answered. */
  readonly inFlight: number;
  /** Items being run now. */
  readonly running: number;
}

export function createInferenceService(deps: {
  backend: InferenceBackend;
  wireDtype: Dtype;
  metrics: InferenceMetrics;
  log: Logger;
  /** Once the model is loaded (the monitor reads its axis then); a throw fails the load, saying why. */
  afterLoad?: (info: GetModelInfoResponse) => void;
  /** Each answer's activation [rows, hidden] (rows: `layers`, all when empty), for the monitor. */
  onActivation?: (activation: FloatTensor, layers: number[]) => void;
}): InferenceService {
  const { backend, wireDtype, metrics, log } = deps;
  const limiter = new Limiter(backend.info.capacity);
  let inFlight = 0;
  let ready = false;
  let loadError: string | undefined;

  const modelInfo = () => {
    // Still loading is passing (the caller tries again, or another replica); a failed load is not.
    if (!ready) throw loadError ? new RpcError(grpc.status.FAILED_PRECONDITION, `model not loaded: ${loadError}`) : new RpcError(grpc.status.UNAVAILABLE, 'model still loading');
    return backend.info;
  };

  /** Runs one request under the capacity limit, with metrics; failures become the item's error. */
  async function serveItem<Req extends { itemId: string }, Res>(rpc: string, req: Req, handle: (req: Req) => Promise<Res>, failed: (itemId: string, code: grpc.status, message: string) => Res): Promise<Res> {
    inFlight++;
    const timer = metrics.seconds.startTimer({ rpc });
    try {
      const res = await limiter.run(() => handle(req));
      metrics.items.inc({ rpc, outcome: 'ok' });
      return res;
    } catch (err) {
      const code = typeof (err as { code?: unknown })?.code === 'number' ? ((err as { code: number }).code as grpc.status) : grpc.status.INTERNAL;
      metrics.items.inc({ rpc, outcome: grpc.status[code] ?? 'error' });
      if (code === grpc.status.INTERNAL) log.error({ err, itemId: req.itemId }, `${rpc} failed`);
      return failed(req.itemId, code, (err as Error).message);
    } finally {
      timer();
      inFlight--;
    }
  }

  return {
    modelInfo,
    get inFlight() {
      return inFlight;
    },
    get running() {
      return limiter.running;
    },
    generate: (req, cancelled, stream) =>
      serveItem<GenerateRequest, GenerateResponse>(
        'Generate',
        req,
        async (r) => {
          const input = validateGenerate(r, modelInfo());
          const out = await backend.generate({ ...input, signal: cancelled, onText: stream?.onText, lane: stream?.lane });
          if (out.timeToFirstTokenSeconds !== undefined) metrics.firstToken.observe(out.timeToFirstTokenSeconds);
          if (out.timePerOutputTokenSeconds !== undefined) metrics.perOutputToken.observe(out.timePerOutputTokenSeconds);
          if (out.activation.shape[0]) deps.onActivation?.(out.activation, input.layers);
          metrics.tokens.inc({ kind: 'prompt' }, out.promptTokens);
          metrics.tokens.inc({ kind: 'completion' }, out.completionTokens);
          return { itemId: r.itemId, text: out.text, promptTokens: out.promptTokens, completionTokens: out.completionTokens, finishReason: out.finishReason, activation: out.activation.shape[0] ? encodeTensor(out.activation, wireDtype) : undefined, error: undefined, responseTokenIds: out.responseIds ?? [] };
        },
        (itemId, code, message) => ({ itemId, text: '', promptTokens: 0, completionTokens: 0, finishReason: '', activation: undefined, error: { code, message }, responseTokenIds: [] }),
      ),
    extract: (req, cancelled) =>
      serveItem<ExtractRequest, ExtractResponse>(
        'Extract',
        req,
        async (r) => {
          const { messages, layers, opts } = validateExtract(r, modelInfo());
          const out = await backend.extract(messages as ChatMessage[], layers, { ...opts, signal: cancelled });
          deps.onActivation?.(out.activation, layers);
          metrics.tokens.inc({ kind: 'prefill' }, out.responseTokens);
          return { itemId: r.itemId, responseTokens: out.responseTokens, activation: encodeTensor(out.activation, wireDtype), error: undefined };
        },
        (itemId, code, message) => ({ itemId, responseTokens: 0, activation: undefined, error: { code, message } }),
      ),
    async projectConversation(req, cancelled) {
      const input = validateProject(req, modelInfo());
      const timer = metrics.seconds.startTimer({ rpc: 'ProjectConversation' });
      try {
        const out = await backend.project({ ...input, signal: cancelled });
        metrics.items.inc({ rpc: 'ProjectConversation', outcome: 'ok' });
        metrics.tokens.inc({ kind: 'prefill' }, out.totalTokens);
        return {
          turns: out.turns.map((t) => ({ messageIndex: t.messageIndex, turn: t.turn, tokens: t.tokens, projections: t.projections, tokenProjections: t.tokenProjections ?? [], counted: t.counted ?? [] })),
          layers: input.axisLayers,
          targetLayer: input.targetLayer,
          totalTokens: out.totalTokens,
        };
      } catch (err) {
        const code = typeof (err as { code?: unknown })?.code === 'number' ? ((err as { code: number }).code as grpc.status) : grpc.status.INTERNAL;
        metrics.items.inc({ rpc: 'ProjectConversation', outcome: grpc.status[code] ?? 'error' });
        if (code === grpc.status.INTERNAL) log.error({ err }, 'ProjectConversation failed');
        throw err;
      } finally {
        timer();
      }
    },
    async load() {
      try {
        await backend.load();
        deps.afterLoad?.(backend.info);
      } catch (err) {
        // Stay up and not ready: the health check says NOT_SERVING, GetModelInfo and the logs say why.
        loadError = (err as Error).message;
        log.error({ reason: loadError }, 'model failed to load; the service stays not ready');
        return false;
      }
      const info = backend.info;
      metrics.loaded(info, backend.decodeKind);
      log.info({ model: info.model, backend: info.backend, device: info.device, decode: backend.decodeKind, stepRuntime: info.stepRuntime || undefined, layers: info.numLayers, hidden: info.hiddenSize, capacity: info.capacity, systemPrompt: info.supportsSystemPrompt, hashes: info.hashes }, 'model loaded');
      ready = true;
      return true;
    },
  };
}

/** The gRPC adapter: each bidi stream's requests run concurrently, each answered when done. */
export function inferenceGrpcHandlers(service: InferenceService, log: Logger): InferenceServiceServer {
  return {
    getModelInfo: unary(log, async () => service.modelInfo()),
    generate: (call) => serveBidi(call, (req: GenerateRequest, cancelled) => service.generate(req, cancelled)),
    extract: (call) => serveBidi(call, (req: ExtractRequest, cancelled) => service.extract(req, cancelled)),
    projectConversation: unary(log, async (req: ProjectConversationRequest, call) => {
      // A caller that goes away stops the pass between chunks.
      const cancelled = new AbortController();
      call.on('cancelled', () => cancelled.abort());
      return service.projectConversation(req, cancelled.signal);
    }),
  };
}
