import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import * as ort from 'onnxruntime-node';
import type { ModelMetadata } from '../../model/build';

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

/**
 * The ONNX decoder of a model directory on onnxruntime (CPU), checked against the metadata it
 * was built with. Needs no tokenizer: it runs token ids.
 */
export class DecoderSession {
  private constructor(readonly dir: string, readonly metadata: ModelMetadata, readonly session: ort.InferenceSession, readonly graphSha256: string) {}

  static async load(dir: string): Promise<DecoderSession> {
    const metadata = await readJson<ModelMetadata>(path.join(dir, 'axis_model.json'), 'the model metadata (made by `axis-model build`)');
    const [first, end] = metadata.layers ?? [0, metadata.num_layers];
    if (first !== 0 || end !== metadata.num_layers) {
      throw new ModelLoadError(`${dir}: holds layers ${first}:${end} of ${metadata.num_layers}, one stage of a split model; this service runs whole models`);
    }
    const graphFile = path.join(dir, metadata.graph);
    let graph: Buffer;
    try {
      graph = await fs.readFile(graphFile);
    } catch {
      throw new ModelLoadError(`${graphFile}: the model directory has no ONNX graph (build one with \`axis-model build\`)`);
    }
    const graphSha = createHash('sha256').update(graph).digest('hex');
    if (graphSha !== metadata.hashes.graph_sha256) throw new ModelLoadError(`${graphFile}: sha256 ${graphSha} differs from axis_model.json (${metadata.hashes.graph_sha256}): the graph was changed after it was built`);
    let session: ort.InferenceSession;
    try {
      session = await ort.InferenceSession.create(graphFile, { executionProviders: ['cpu'], graphOptimizationLevel: 'all' });
    } catch (err) {
      throw new ModelLoadError(`${graphFile}: onnxruntime cannot load it: ${(err as Error).message}`);
    }
    const missing = (want: string[], have: readonly string[]) => want.filter((n) => !have.includes(n));
    const mismatch = [
      ...missing(metadata.inputs, session.inputNames).map((n) => `input ${n} missing from the graph`),
      ...missing([...session.inputNames], metadata.inputs).map((n) => `graph input ${n} not in the metadata`),
      ...missing(metadata.outputs, session.outputNames).map((n) => `output ${n} missing from the graph`),
      ...missing([...session.outputNames], metadata.outputs).map((n) => `graph output ${n} not in the metadata`),
    ];
    if (metadata.hidden_state_outputs.length !== metadata.num_layers) mismatch.push(`${metadata.hidden_state_outputs.length} hidden-state outputs for ${metadata.num_layers} layers (built with --no-capture?)`);
    if (mismatch.length) {
      await session.release();
      throw new ModelLoadError(`${graphFile} does not match axis_model.json: ${mismatch.join('; ')}`);
    }
    return new DecoderSession(dir, metadata, session, graphSha);
  }

  /** Empty KV cache for a new sequence. */
  emptyPast(): Record<string, ort.Tensor> {
    const { num_layers: L, num_key_value_heads: kv, head_dim: hd } = this.metadata;
    const past: Record<string, ort.Tensor> = {};
    for (let l = 0; l < L; l++) {
      past[`past_key_values.${l}.key`] = new ort.Tensor('float32', new Float32Array(0), [1, kv, 0, hd]);
      past[`past_key_values.${l}.value`] = new ort.Tensor('float32', new Float32Array(0), [1, kv, 0, hd]);
    }
    return past;
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
