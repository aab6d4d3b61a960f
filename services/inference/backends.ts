import type { Config } from '../shared/config';
import type { InferenceBackend } from './backend';
import { BatchStats, OnnxBackend, parseCudaOptions, PrefillStats, SLOT_POLICIES, SlotPolicy, STEP_RUNTIMES, StepRuntime, StepStats } from './onnx';
import { CompletionsGenerator, GENERATOR_DEFAULTS, GeneratorOutcome, readGeneratorKey } from './generator';
import type { INFERENCE_OPTIONS } from './options';
import { SyntheticBackend } from './synthetic';

/** The backend the options name, with its options checked (a clear error naming the flag otherwise). */
export function createBackend(cfg: Config<typeof INFERENCE_OPTIONS>, hooks: { onBatch?: (s: BatchStats) => void; onStep?: (s: StepStats) => void; onPrefill?: (p: PrefillStats) => void; onGenerator?: (outcome: GeneratorOutcome) => void; warn?: (msg: string) => void; info?: (msg: string) => void } = {}): InferenceBackend {
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
    if (!(SLOT_POLICIES as readonly string[]).includes(cfg['slot-policy'])) throw new Error(`--slot-policy must be one of ${SLOT_POLICIES.join(', ')}, got ${cfg['slot-policy']}`);
    if (!(Number.isInteger(cfg['chat-slots']) && cfg['chat-slots'] >= 0)) throw new Error(`--chat-slots must be a whole number >= 0, got ${cfg['chat-slots']}`);
    if (!['auto', ...STEP_RUNTIMES].includes(cfg['step-runtime'])) throw new Error(`--step-runtime must be auto, ${STEP_RUNTIMES.join(' or ')}, got ${cfg['step-runtime']}`);
    if (!['auto', 'slots', 'loop', 'host'].includes(cfg.decode)) throw new Error(`--decode must be auto, slots, loop or host, got ${cfg.decode}`);
    if (!(Number.isInteger(cfg['max-batch']) && cfg['max-batch'] >= 1)) throw new Error(`--max-batch must be a whole number >= 1, got ${cfg['max-batch']}`);
    if (!(cfg['max-batch-tokens'] >= 1)) throw new Error(`--max-batch-tokens must be >= 1, got ${cfg['max-batch-tokens']}`);
    if (!(cfg['batch-gather-ms'] >= 0)) throw new Error(`--batch-gather-ms must be >= 0, got ${cfg['batch-gather-ms']}`);
    let generator: CompletionsGenerator | undefined;
    if (cfg.generator) {
      if (cfg.generator !== 'openai') throw new Error(`--generator must be openai (or empty: this engine generates), got ${JSON.stringify(cfg.generator)}`);
      if (!/^https?:\/\//.test(cfg['generator-url'])) throw new Error(`--generator-url must be the http(s) base URL of an OpenAI-compatible API (e.g. http://vllm:8000/v1), got ${JSON.stringify(cfg['generator-url'])}`);
      if (!(Number.isInteger(cfg['generator-concurrency']) && cfg['generator-concurrency'] >= 1)) throw new Error(`--generator-concurrency must be a whole number >= 1, got ${cfg['generator-concurrency']}`);
      if (!(cfg['generator-timeout-seconds'] > 0)) throw new Error(`--generator-timeout-seconds must be > 0, got ${cfg['generator-timeout-seconds']}`);
      if (!['greedy', 'off'].includes(cfg['generator-check'])) throw new Error(`--generator-check must be greedy or off, got ${JSON.stringify(cfg['generator-check'])}`);
      generator = new CompletionsGenerator({
        ...GENERATOR_DEFAULTS,
        url: cfg['generator-url'],
        model: cfg['generator-model'],
        apiKey: readGeneratorKey(cfg['generator-api-key-file']),
        concurrency: cfg['generator-concurrency'],
        timeoutMs: cfg['generator-timeout-seconds'] * 1000,
        onOutcome: hooks.onGenerator,
      });
    }
    return new OnnxBackend({
      generator,
      generatorCheck: cfg['generator-check'] as 'greedy' | 'off',
      cappingConfig: cfg['capping-config'] || undefined,
      modelDirs: cfg['model-dir'].split(',').map((d) => d.trim()).filter(Boolean),
      model: cfg.model,
      capacity: cfg.capacity || 2 * cfg['max-batch'],
      device: cfg.device,
      decode: cfg.decode as 'auto' | 'slots' | 'loop' | 'host',
      maxBatch: cfg['max-batch'],
      maxBatchTokens: cfg['max-batch-tokens'],
      gatherMs: cfg['batch-gather-ms'],
      deviceMemory: cfg['device-memory'],
      slotLength: cfg['slot-length'],
      slotPolicy: cfg['slot-policy'] as SlotPolicy,
      chatSlots: cfg['chat-slots'],
      stepRuntime: cfg['step-runtime'] as StepRuntime | 'auto',
      cudaOptions: parseCudaOptions(cfg['cuda-options']),
      ...hooks,
    });
  }
  throw new Error(`--backend: unknown backend ${JSON.stringify(cfg.backend)} (known: onnx, synthetic)`);
}
