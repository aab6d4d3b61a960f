import type { OptionTable } from '../shared/config';
import { DEFAULT_METRICS_PORTS, DEFAULT_PORTS } from '../shared/defaults';
import { CALLER_TOKEN_OPTION } from '../shared/auth';
import { TLS_OPTIONS } from '../shared/tls';

/** The inference service's flags and environment variables, with their defaults (docs/CONFIGURATION.md is made from it). */
export const INFERENCE_OPTIONS = {
  host: { type: 'string', env: 'AXIS_HOST', default: '127.0.0.1', help: 'address to listen on' },
  port: { type: 'number', env: 'AXIS_INFERENCE_PORT', default: DEFAULT_PORTS.inference, help: 'gRPC port' },
  'metrics-port': { type: 'number', env: 'AXIS_INFERENCE_METRICS_PORT', default: DEFAULT_METRICS_PORTS.inference, help: 'Prometheus metrics port' },
  backend: { type: 'string', env: 'AXIS_INFERENCE_BACKEND', default: 'synthetic', help: 'model backend: onnx (a model directory) or synthetic (no model; for plumbing, load and fault tests)' },
  'model-dir': { type: 'string', env: 'AXIS_MODEL_DIR', default: '', help: 'onnx backend: model directory made by `axis-model build`, or the stages of a split model (`--layers` builds), comma-separated in layer order' },
  device: { type: 'string', env: 'AXIS_DEVICE', default: 'cpu', help: 'onnx backend: cpu, cuda (GPU 0, or GPU k for stage k), auto (CUDA when it loads, else CPU, with a warning), or one cpu/cuda:N per stage, comma-separated' },
  decode: { type: 'string', env: 'AXIS_DECODE', default: 'auto', help: 'onnx backend: slots (continuous batching over the step graph: an item joins at the next step and leaves when it ends), loop (the generation graph: one run per batch), host (one run per token; split models) or auto (slots when the model\'s step graph runs on this device, else loop when the model has it, else host)' },
  'max-batch': { type: 'number', env: 'AXIS_MAX_BATCH', default: 16, help: 'onnx backend: most sequences at once (slots: the slots, if the memory plan has that many; loop, host: one batch)' },
  'max-batch-tokens': { type: 'number', env: 'AXIS_MAX_BATCH_TOKENS', default: 16384, help: 'onnx backend: most padded prompt tokens in one batch (sequences x longest prompt)' },
  'device-memory': { type: 'string', env: 'AXIS_DEVICE_MEMORY', default: '', help: 'onnx backend: memory of each device for the memory plan, e.g. 80GiB or 141GB (empty: the machine\'s RAM on the CPU; on CUDA no plan is made without it)' },
  'slot-length': { type: 'number', env: 'AXIS_SLOT_LENGTH', default: 2560, help: 'onnx backend: tokens one sequence may hold, prompt and answer (the memory plan reserves this much KV cache per sequence; longer conversations are refused)' },
  'slot-policy': { type: 'string', env: 'AXIS_SLOT_POLICY', default: 'fifo', help: 'onnx backend, slots engine: which waiting item takes a free slot: fifo (the oldest first; the only policy so far)' },
  'step-runtime': { type: 'string', env: 'AXIS_STEP_RUNTIME', default: 'auto', help: 'onnx backend, slots engine: native (onnxruntime\'s C API: KV buffers allocated and kept on the device, IO binding), stock (onnxruntime-node\'s JavaScript API) or auto (native, else stock with a warning saying why)' },
  'cuda-options': { type: 'string', env: 'AXIS_CUDA_OPTIONS', default: '', help: 'onnx backend, native step runtime on CUDA: options of onnxruntime\'s CUDA provider by its names, key=value pairs comma-separated (e.g. enable_cuda_graph=0,do_copy_in_default_stream=1), over arena_extend_strategy=kSameAsRequested, cudnn_conv_algo_search=HEURISTIC and gpu_mem_limit = --device-memory' },
  'batch-gather-ms': { type: 'number', env: 'AXIS_BATCH_GATHER_MS', default: 20, help: 'onnx backend: how long an idle engine waits for a batch to fill' },
  model: { type: 'string', env: 'AXIS_MODEL', default: '', help: 'model name reported to runs (empty: the model directory\'s name; synthetic-tiny for the synthetic backend)' },
  'synthetic-layers': { type: 'number', env: 'AXIS_SYNTHETIC_LAYERS', default: 8, help: 'synthetic backend: layers' },
  'synthetic-hidden': { type: 'number', env: 'AXIS_SYNTHETIC_HIDDEN', default: 64, help: 'synthetic backend: hidden size' },
  'synthetic-tokens-per-second': { type: 'number', env: 'AXIS_SYNTHETIC_TOKENS_PER_SECOND', default: 0, help: 'synthetic backend: words per second per item (0 = no delay)' },
  'synthetic-items-per-second': { type: 'number', env: 'AXIS_SYNTHETIC_ITEMS_PER_SECOND', default: 0, help: 'synthetic backend: items answered per second by the replica, whatever the concurrency (0 = no limit; rehearsals of a GPU node\'s pace)' },
  'synthetic-system-prompt': { type: 'boolean', env: 'AXIS_SYNTHETIC_SYSTEM_PROMPT', default: true, help: 'synthetic backend: whether its chat template renders a system message' },
  generator: { type: 'string', env: 'AXIS_GENERATOR', default: '', help: 'onnx backend: where answers are generated: empty (this engine) or openai (an OpenAI-compatible server: vLLM, SGLang, TGI; prompts as token ids, answers measured here by a prefill over their tokens)' },
  'generator-url': { type: 'string', env: 'AXIS_GENERATOR_URL', default: '', help: 'with --generator openai: the API\'s base URL, e.g. http://vllm:8000/v1' },
  'generator-model': { type: 'string', env: 'AXIS_GENERATOR_MODEL', default: '', help: 'with --generator openai: the served model\'s name (empty: the only one the server lists)' },
  'generator-api-key-file': { type: 'string', env: 'AXIS_GENERATOR_API_KEY_FILE', default: '', help: 'with --generator openai: a file holding the server\'s API key, if it wants one' },
  'generator-concurrency': { type: 'number', env: 'AXIS_GENERATOR_CONCURRENCY', default: 64, help: 'with --generator openai: requests in flight to the server at once (it batches them itself)' },
  'generator-timeout-seconds': { type: 'number', env: 'AXIS_GENERATOR_TIMEOUT_SECONDS', default: 900, help: 'with --generator openai: a request unanswered this long is abandoned and sent again (up to 8 attempts in all, as for 429, 5xx and dropped connections)' },
  'generator-check': { type: 'string', env: 'AXIS_GENERATOR_CHECK', default: 'greedy', help: 'with --generator openai: greedy (at load the server must continue fixed prompts greedily as this model does, else the replica stays not ready) or off (the same weights in another precision can part at near ties)' },
  'capping-config': { type: 'string', env: 'AXIS_CAPPING_CONFIG', default: '', help: 'onnx backend, slots engine: a capping config (PREFIX of PREFIX.json and PREFIX.safetensors, as `axis calibrate` writes) whose experiments items may name (StartRun capping_experiment): activation capping in the step graph' },
  'monitor-axis': { type: 'string', env: 'AXIS_MONITOR_AXIS', default: '', help: 'an axis (a run\'s axis.safetensors) to project every answer on at the model\'s target layer: the axis_inference_answer_projection histogram and the share of answers below --monitor-threshold (the persona alert)' },
  'monitor-threshold': { type: 'string', env: 'AXIS_MONITOR_THRESHOLD', default: '', help: 'with --monitor-axis: the projection below which an answer counts as drifted (empty: the axis run\'s default answers\' 25th percentile at the target layer, which its axis.safetensors carries)' },
  capacity: { type: 'number', env: 'AXIS_INFERENCE_CAPACITY', default: 0, help: 'items accepted at once (0: the backend\'s default: twice --max-batch for onnx, so the next batch is ready when one ends; 16 for synthetic)' },
  'activation-dtype': { type: 'string', env: 'AXIS_ACTIVATION_DTYPE', default: 'f32', help: 'wire dtype of activations: f32, f16 or bf16' },
  ...TLS_OPTIONS,
  ...CALLER_TOKEN_OPTION,
} satisfies OptionTable;
