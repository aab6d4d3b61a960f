import type { Registry } from 'prom-client';
import type { GetModelInfoResponse } from '../../gen/assistant_axis/v1/inference';
import { prom } from '../shared/metrics';

/** What the gauges read when scraped. */
export interface InferenceLoad {
  /** Items received and not yet answered (running + waiting). */
  inFlight(): number;
  /** Items being generated or prefilled now. */
  running(): number;
  /** Sequences in the batch running now. */
  batchSize(): number;
}

/** The inference service's Prometheus metrics; the families users know from vLLM: running and waiting requests, latency, time to first token, batch size. */
export function inferenceMetrics(registry: Registry, load: InferenceLoad) {
  const registers = [registry];
  const gauge = (name: string, help: string, read: () => number) =>
    new prom.Gauge({
      name,
      help,
      registers,
      collect() {
        this.set(read());
      },
    });
  gauge('axis_inference_in_flight', 'Items received and not yet answered (running + waiting)', () => load.inFlight());
  gauge('axis_inference_requests_running', 'Items being generated or prefilled now', () => load.running());
  gauge('axis_inference_requests_waiting', 'Items received and waiting for a free slot', () => Math.max(0, load.inFlight() - load.running()));
  gauge('axis_inference_batch_size', 'Sequences in the batch running now (0 when idle); the synthetic backend runs each item alone', () => load.batchSize());
  const modelInfo = new prom.Gauge({ name: 'axis_inference_model_info', help: 'The loaded model (value 1)', labelNames: ['model_name', 'backend', 'device', 'architecture', 'decode'], registers });
  const slots = new prom.Gauge({ name: 'axis_inference_slots', help: 'Sequences the memory plan lets this replica hold at once (0: no plan)', registers });
  gauge('axis_inference_slot_occupancy', 'Busy slots over slots (the slots engine; 0 without a plan)', () => (slotCount ? load.batchSize() / slotCount : 0));
  let slotCount = 0;
  const slotLength = new prom.Gauge({ name: 'axis_inference_slot_length_tokens', help: 'Tokens one sequence may hold, prompt and answer (the memory plan\'s slot length)', registers });
  const provider = new prom.Gauge({ name: 'axis_inference_execution_provider', help: 'The onnxruntime execution provider each stage runs on (value 1)', labelNames: ['provider', 'device'], registers });
  return {
    batchSizes: new prom.Histogram({ name: 'axis_inference_batch_sequences', help: 'Sequences per batch run', buckets: [1, 2, 4, 8, 16, 32, 64, 128], registers }),
    stepTokens: new prom.Histogram({ name: 'axis_inference_step_tokens', help: 'Tokens decoded per step of the slots engine (its busy slots)', buckets: [1, 2, 4, 8, 16, 32, 64, 128, 256], registers }),
    stepSeconds: new prom.Histogram({ name: 'axis_inference_step_seconds', help: 'Time of one decoding step of the slots engine', buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5], registers }),
    // vLLM's prefix-cache counters, in tokens: the hit rate is hits / queries.
    prefixCacheQueries: new prom.Counter({ name: 'axis_inference_prefix_cache_queries_total', help: 'Prompt tokens prefilled by the slots engine, reused or not', registers }),
    prefixCacheHits: new prom.Counter({ name: 'axis_inference_prefix_cache_hits_total', help: 'Prompt tokens whose keys and values were reused from a slot instead of computed', registers }),
    prompts: new prom.Counter({ name: 'axis_inference_prompts_total', help: 'Prompts run into a slot by the slots engine, by how: joined (in a decoding step\'s run, the weights read once for both) or alone (a run of its own)', labelNames: ['run'], registers }),
    hostDraws: new prom.Counter({ name: 'axis_inference_host_draws_total', help: 'Tokens drawn on the host (a CPU), by where: candidates (among the most probable ids the step graph gives) or vocabulary (from the whole logits: greedy rows, top_p 1, a nucleus past the candidates)', labelNames: ['source'], registers }),
    generatorRequests: new prom.Counter({ name: 'axis_inference_generator_requests_total', help: 'Requests to the generator (--generator openai), by outcome: ok, rate_limited, server_error, timeout, dropped (each retried), refused, failed (out of attempts)', labelNames: ['outcome'], registers }),
    batchSeconds: new prom.Histogram({ name: 'axis_inference_batch_seconds', help: 'Time to run one batch to its end', buckets: [0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300], registers }),
    items: new prom.Counter({ name: 'axis_inference_items_total', help: 'Items answered, by RPC and outcome', labelNames: ['rpc', 'outcome'], registers }),
    tokens: new prom.Counter({ name: 'axis_inference_tokens_total', help: 'Tokens processed, by kind', labelNames: ['kind'], registers }),
    seconds: new prom.Histogram({ name: 'axis_inference_e2e_request_latency_seconds', help: 'Time from an item\'s arrival to its answer', labelNames: ['rpc'], buckets: [0.001, 0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300], registers }),
    firstToken: new prom.Histogram({ name: 'axis_inference_time_to_first_token_seconds', help: 'Time from the start of an item\'s generation to its first token', buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30], registers }),
    perOutputToken: new prom.Histogram({ name: 'axis_inference_time_per_output_token_seconds', help: 'After an answer\'s first token, the mean time of each further one', buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1], registers }),
    /** The loaded model and where each stage runs (value 1). */
    loaded(info: GetModelInfoResponse, decode: string): void {
      modelInfo.set({ model_name: info.model, backend: info.backend, device: info.device, architecture: info.architecture, decode }, 1);
      slots.set(info.slots);
      slotCount = info.slots;
      slotLength.set(info.slotLength);
      for (const d of info.device.split(',')) provider.set({ provider: d.startsWith('cuda') ? 'CUDAExecutionProvider' : d === 'cpu' ? 'CPUExecutionProvider' : 'none', device: d }, 1);
    },
  };
}

export type InferenceMetrics = ReturnType<typeof inferenceMetrics>;

/**
 * The persona metrics of a replica started with --monitor-axis (made once the axis is read:
 * the histogram's buckets come from where the axis run's answers lie). By model only
 * (`model_name`, as vLLM labels its series): no per-conversation labels.
 */
export function monitorMetrics(registry: Registry, model: string, buckets: number[], threshold: number | undefined) {
  const registers = [registry];
  const projection = new prom.Histogram({ name: 'axis_inference_answer_projection', help: 'Each answer\'s projection on the monitored axis at the target layer (--monitor-axis)', labelNames: ['model_name'], buckets, registers });
  const answers = new prom.Counter({ name: 'axis_inference_monitored_answers_total', help: 'Answers projected on the monitored axis', labelNames: ['model_name'], registers });
  const below = new prom.Counter({ name: 'axis_inference_answers_below_threshold_total', help: 'Answers whose projection fell below --monitor-threshold (drifted from the Assistant)', labelNames: ['model_name'], registers });
  const limit = new prom.Gauge({ name: 'axis_inference_monitor_threshold', help: 'The projection below which an answer counts as drifted', labelNames: ['model_name'], registers });
  if (threshold !== undefined) limit.set({ model_name: model }, threshold);
  // Zero from the start, so that rates exist before the first drifted answer.
  answers.inc({ model_name: model }, 0);
  below.inc({ model_name: model }, 0);
  return (value: number) => {
    projection.observe({ model_name: model }, value);
    answers.inc({ model_name: model });
    if (threshold !== undefined && value < threshold) below.inc({ model_name: model });
  };
}

/** The chat endpoint's answers, capped (an experiment applied) or not. */
export function chatMetrics(registry: Registry, model: string): (capped: boolean) => void {
  const answers = new prom.Counter({ name: 'axis_inference_chat_answers_total', help: 'Answers of the chat endpoint, by whether an experiment of the capping config was applied', labelNames: ['model_name', 'capped'], registers: [registry] });
  answers.inc({ model_name: model, capped: 'yes' }, 0);
  answers.inc({ model_name: model, capped: 'no' }, 0);
  return (capped) => answers.inc({ model_name: model, capped: capped ? 'yes' : 'no' });
}
