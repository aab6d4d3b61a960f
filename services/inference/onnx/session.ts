import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import * as ort from 'onnxruntime-node';
import { MODEL_FILES, ModelMetadata } from '../../contracts/modelDirectory';

export class ModelLoadError extends Error {}

/** What one forward pass returns that the generation loop uses. */
export interface StepOutput {
  /** Logits of the last position [vocab]. */
  lastLogits: Float32Array;
  /** Logits of every new position [positions * vocab]. */
  allLogits: Float32Array;
  /** Per layer, the hidden states of the new positions, [positions * hidden]. */
  hidden: Float32Array[];
  present: Record<string, ort.Tensor>;
}

/** Where a session runs: onnxruntime's CPU provider, or CUDA on one GPU. */
export interface Placement {
  provider: 'cpu' | 'cuda';
  deviceId: number;
  /** CUDA provider options by onnxruntime's names, over `CUDA_PROVIDER_DEFAULTS` (the native step runtime applies them). */
  cudaOptions?: Record<string, string>;
}

/**
 * The CUDA provider's options the native step runtime sets unless told otherwise: the arena
 * grows by what is asked (not by doubling, which strands gigabytes next to a large model's
 * weights), and cuDNN picks algorithms by heuristics (no benchmarking at load).
 */
export const CUDA_PROVIDER_DEFAULTS: Record<string, string> = { arena_extend_strategy: 'kSameAsRequested', cudnn_conv_algo_search: 'HEURISTIC' };

/**
 * `--cuda-options`: key=value pairs, comma-separated, by onnxruntime's names (e.g.
 * gpu_mem_limit=70000000000,enable_cuda_graph=0). Which keys exist is onnxruntime's to say
 * (an unknown one fails the session's creation with its message); here only the form is checked.
 */
export function parseCudaOptions(text: string): Record<string, string> {
  const options: Record<string, string> = {};
  for (const pair of text.split(',').map((p) => p.trim()).filter(Boolean)) {
    const m = /^([a-z][a-z0-9_]*)=([A-Za-z0-9_.-]+)$/.exec(pair);
    if (!m) throw new ModelLoadError(`--cuda-options: ${JSON.stringify(pair)} is not key=value (a lower-case option name of onnxruntime's CUDA provider, a value of letters, digits, '_', '.' or '-')`);
    if (m[1] === 'device_id') throw new ModelLoadError('--cuda-options: device_id is set by --device (cuda:N)');
    options[m[1]] = m[2];
  }
  return options;
}

export const CPU: Placement = { provider: 'cpu', deviceId: 0 };

export function placementName(p: Placement): string {
  return p.provider === 'cpu' ? 'cpu' : `cuda:${p.deviceId}`;
}

/**
 * Creates a session on the placement asked for and nowhere else: onnxruntime-node throws when
 * CUDA is missing rather than falling back, and the caller decides (and logs) any fallback.
 */
export async function createSession(file: string, placement: Placement): Promise<ort.InferenceSession> {
  const providers = placement.provider === 'cuda' ? [{ name: 'cuda', deviceId: placement.deviceId } as ort.InferenceSession.ExecutionProviderConfig] : ['cpu'];
  try {
    return await ort.InferenceSession.create(file, { executionProviders: providers, graphOptimizationLevel: 'all' });
  } catch (err) {
    throw new ModelLoadError(`${file}: onnxruntime cannot load it on ${placementName(placement)}: ${(err as Error).message}`);
  }
}

/** Reads a graph file and checks it is the one the metadata describes. */
export async function checkedGraph(dir: string, relative: string, expectedSha: string): Promise<{ file: string; sha256: string }> {
  const file = path.join(dir, relative);
  let graph: Buffer;
  try {
    graph = await fs.readFile(file);
  } catch {
    throw new ModelLoadError(`${file}: the model directory has no ONNX graph (build one with \`axis-model build\`)`);
  }
  const sha = createHash('sha256').update(graph).digest('hex');
  if (sha !== expectedSha) throw new ModelLoadError(`${file}: sha256 ${sha} differs from axis_model.json (${expectedSha}): the graph was changed after it was built`);
  return { file, sha256: sha };
}

export async function readMetadata(dir: string): Promise<ModelMetadata> {
  return readJson<ModelMetadata>(path.join(dir, MODEL_FILES.metadata), 'the model metadata (made by `axis-model build`)');
}

/**
 * The ONNX decoder graph of a model directory (a whole model, or one stage of a split one) on
 * onnxruntime, checked against the metadata it was built with. Needs no tokenizer: it runs
 * token ids (or, for a later stage, the previous stage's hidden states).
 */
export class DecoderSession {
  private constructor(readonly dir: string, readonly metadata: ModelMetadata, readonly session: ort.InferenceSession, readonly graphSha256: string, readonly placement: Placement) {}

  get layers(): [number, number] {
    return this.metadata.layers ?? [0, this.metadata.num_layers];
  }

  static async load(dir: string, placement: Placement = CPU): Promise<DecoderSession> {
    const metadata = await readMetadata(dir);
    const { file: graphFile, sha256: graphSha } = await checkedGraph(dir, metadata.graph, metadata.hashes.graph_sha256);
    const session = await createSession(graphFile, placement);
    const missing = (want: string[], have: readonly string[]) => want.filter((n) => !have.includes(n));
    const mismatch = [
      ...missing(metadata.inputs, session.inputNames).map((n) => `input ${n} missing from the graph`),
      ...missing([...session.inputNames], metadata.inputs).map((n) => `graph input ${n} not in the metadata`),
      ...missing(metadata.outputs, session.outputNames).map((n) => `output ${n} missing from the graph`),
      ...missing([...session.outputNames], metadata.outputs).map((n) => `graph output ${n} not in the metadata`),
    ];
    const [first, end] = metadata.layers ?? [0, metadata.num_layers];
    if (metadata.hidden_state_outputs.length !== end - first) mismatch.push(`${metadata.hidden_state_outputs.length} hidden-state outputs for ${end - first} layers (built with --no-capture?)`);
    if (mismatch.length) {
      await session.release();
      throw new ModelLoadError(`${graphFile} does not match axis_model.json: ${mismatch.join('; ')}`);
    }
    return new DecoderSession(dir, metadata, session, graphSha, placement);
  }

  /** Empty KV cache of this graph's layers for a batch. */
  emptyBatchPast(batch: number): Record<string, ort.Tensor> {
    const { num_key_value_heads: kv, head_dim: hd } = this.metadata;
    const past: Record<string, ort.Tensor> = {};
    const [first, end] = this.layers;
    for (let l = first; l < end; l++) {
      past[`past_key_values.${l}.key`] = new ort.Tensor('float32', new Float32Array(0), [batch, kv, 0, hd]);
      past[`past_key_values.${l}.value`] = new ort.Tensor('float32', new Float32Array(0), [batch, kv, 0, hd]);
    }
    return past;
  }

  /** Empty KV cache for a new sequence. */
  emptyPast(): Record<string, ort.Tensor> {
    return this.emptyBatchPast(1);
  }

  /** Feeds `ids` at positions pastLength.. after the cached `past` (one sequence, no padding). */
  async step(ids: number[], pastLength: number, past: Record<string, ort.Tensor>): Promise<StepOutput> {
    const n = ids.length;
    const total = pastLength + n;
    const feeds: Record<string, ort.Tensor> = {
      input_ids: new ort.Tensor('int64', BigInt64Array.from(ids, BigInt), [1, n]),
      attention_mask: new ort.Tensor('int64', new BigInt64Array(total).fill(1n), [1, total]),
      position_ids: new ort.Tensor('int64', BigInt64Array.from({ length: n }, (_, i) => BigInt(pastLength + i)), [1, n]),
    };
    for (let l = 0; l < this.metadata.num_layers; l++) {
      feeds[`past_key_values.${l}.key`] = past[`past_key_values.${l}.key`] ?? past[`present.${l}.key`];
      feeds[`past_key_values.${l}.value`] = past[`past_key_values.${l}.value`] ?? past[`present.${l}.value`];
    }
    const out = await this.session.run(feeds);
    const logits = out.logits.data as Float32Array;
    const vocab = this.metadata.vocab_size;
    const present: Record<string, ort.Tensor> = {};
    for (let l = 0; l < this.metadata.num_layers; l++) {
      present[`present.${l}.key`] = out[`present.${l}.key`];
      present[`present.${l}.value`] = out[`present.${l}.value`];
    }
    return {
      lastLogits: logits.subarray((n - 1) * vocab, n * vocab),
      allLogits: logits,
      hidden: this.metadata.hidden_state_outputs.map((name) => out[name].data as Float32Array),
      present,
    };
  }

  /** One pass over a whole sequence from an empty cache: every position's hidden states and logits. */
  async forward(ids: number[]): Promise<{ hidden: Float32Array[]; allLogits: Float32Array }> {
    const out = await this.step(ids, 0, this.emptyPast());
    return { hidden: out.hidden, allLogits: out.allLogits };
  }

  async close(): Promise<void> {
    await this.session.release();
  }
}


export async function readJson<T>(file: string, what: string): Promise<T> {
  let raw: string;
  try {
    raw = await fs.readFile(file, 'utf8');
  } catch {
    throw new ModelLoadError(`${file}: missing (${what})`);
  }
  try {
    return JSON.parse(raw) as T;
  } catch (err) {
    throw new ModelLoadError(`${file}: not valid JSON (${(err as Error).message})`);
  }
}
