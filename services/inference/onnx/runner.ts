import type { Steering } from './steering';
import * as ort from 'onnxruntime-node';
import type { ModelMetadata } from '../../contracts/modelDirectory';
import { LOOP_INPUTS, LOOP_OUTPUTS, NO_TOKEN, TOKEN_KIND } from '../../contracts/modelDirectory';
import { ResponseMean, TokenKind } from './responseMean';
import { sampleToken } from './sampling';
import { checkedGraph, createSession, DecoderSession, ModelLoadError, Placement, placementName } from './session';

/**
 * One sequence of a batch: a prompt to answer (maxNew > 0), or a conversation whose answer
 * positions are weighted in the mean (Extract: maxNew = 0 and `weights`).
 */
export interface SequenceJob {
  ids: number[];
  maxNew: number;
  temperature: number;
  topP: number;
  /** The n-th uniform in [0, 1) decides the n-th sampled token (length >= maxNew). */
  uniforms: Float32Array;
  /** Extract: 1 at the answer positions that count (docs/CONCEPTS.md), 0 elsewhere. */
  weights?: Float32Array;
  /** Interventions on the residual stream while this sequence runs (capping; the slots engine only). */
  steering?: Steering;
  /**
   * Each token as it is sampled (the stop token excluded), for streaming (the slots engine only);
   * returning true ends the answer after this token (a stop string in its text), as a stop token would.
   */
  onToken?: (id: number) => boolean | void;
}

export interface SequenceResult {
  /** Sampled tokens, the stop token (when one ended the answer) excluded. */
  responseIds: number[];
  stopped: boolean;
  /** Per-layer mean [numLayers * hidden] over the counted tokens; zeros when none counted. */
  mean: Float32Array;
  counted: number;
}

/** What the model knows of its tokens that generation needs. */
export interface TokenRules {
  stopIds: Set<number>;
  tokenKind(id: number): TokenKind;
  /** Every id's kind as the graph wants it (0 content, 1 whitespace, 2 marker). */
  kindTable(): BigInt64Array;
}

/** Runs batches of sequences; one batch at a time. */
export interface BatchRunner {
  /** `slots` (continuous batching over the step graph), `loop` (one run per batch of the generation graph) or `host` (one run per token). */
  readonly kind: 'slots' | 'loop' | 'host';
  readonly placements: Placement[];
  run(jobs: SequenceJob[]): Promise<SequenceResult[]>;
  close(): Promise<void>;
}

/** Left padding: each row's tokens end at the same column, so every row's next token goes in the same place. */
export function leftPad(rows: number[][]): { width: number; ids: BigInt64Array; mask: BigInt64Array; positions: BigInt64Array } {
  const width = Math.max(...rows.map((r) => r.length));
  const B = rows.length;
  const ids = new BigInt64Array(B * width);
  const mask = new BigInt64Array(B * width);
  const positions = new BigInt64Array(B * width);
  rows.forEach((row, b) => {
    const offset = width - row.length;
    row.forEach((t, i) => {
      ids[b * width + offset + i] = BigInt(t);
      mask[b * width + offset + i] = 1n;
      positions[b * width + offset + i] = BigInt(i);
    });
  });
  return { width, ids, mask, positions };
}

const i64 = (data: BigInt64Array, dims: number[]) => new ort.Tensor('int64', data, dims);

/** The generation graph (onnx/generate.onnx): a whole batch per run, sampling and sums in the graph. */
export class LoopRunner implements BatchRunner {
  readonly kind = 'loop';
  private kinds: ort.Tensor | undefined;
  private stops: ort.Tensor;

  private constructor(private readonly session: ort.InferenceSession, private readonly metadata: ModelMetadata, readonly placements: Placement[], private readonly rules: TokenRules, private readonly measures: boolean) {
    const stops = [...rules.stopIds];
    this.stops = i64(BigInt64Array.from(stops.map(BigInt)), [stops.length]);
  }

  /** `textOnly`: accept a graph built with --no-capture (benchmarks); its means are zeros. */
  static async load(dir: string, metadata: ModelMetadata, placement: Placement, rules: TokenRules, textOnly = false): Promise<LoopRunner> {
    const loop = metadata.decode_loop;
    if (!loop) throw new ModelLoadError(`${dir}: no generation graph in axis_model.json (built with --no-decode-loop, or a stage of a split model): use the host loop`);
    const measures = loop.outputs.includes(LOOP_OUTPUTS.responseMean);
    if (!measures && !textOnly) throw new ModelLoadError(`${dir}: the generation graph was built without capture (--no-capture): it cannot measure activations`);
    const { file } = await checkedGraph(dir, loop.graph, loop.graph_sha256);
    const session = await createSession(file, placement);
    return new LoopRunner(session, metadata, [placement], rules, measures);
  }

  async run(jobs: SequenceJob[]): Promise<SequenceResult[]> {
    const B = jobs.length;
    const { width, ids, mask, positions } = leftPad(jobs.map((j) => j.ids));
    const maxNew = Math.max(0, ...jobs.map((j) => j.maxNew));
    const N = Math.max(1, maxNew);
    const weights = new Float32Array(B * width);
    const uniforms = new Float32Array(B * N);
    jobs.forEach((j, b) => {
      if (j.weights) weights.set(j.weights, b * width + (width - j.ids.length));
      uniforms.set(j.uniforms.subarray(0, Math.min(N, j.uniforms.length)), b * N);
    });
    const I = LOOP_INPUTS;
    const feeds: Record<string, ort.Tensor> = {
      [I.inputIds]: i64(ids, [B, width]),
      [I.attentionMask]: i64(mask, [B, width]),
      [I.positionIds]: i64(positions, [B, width]),
      [I.maxSteps]: i64(BigInt64Array.of(BigInt(maxNew + 1)), []),
      [I.maxNewTokens]: i64(BigInt64Array.from(jobs.map((j) => BigInt(j.maxNew))), [B]),
      [I.temperature]: new ort.Tensor('float32', Float32Array.from(jobs.map((j) => j.temperature)), [B]),
      [I.topP]: new ort.Tensor('float32', Float32Array.from(jobs.map((j) => j.topP)), [B]),
      [I.uniforms]: new ort.Tensor('float32', uniforms, [B, N]),
      [I.stopTokenIds]: this.stops,
    };
    if (this.measures) {
      this.kinds ??= i64(this.rules.kindTable(), [this.metadata.vocab_size]);
      feeds[I.promptWeights] = new ort.Tensor('float32', weights, [B, width]);
      feeds[I.tokenKinds] = this.kinds;
    }
    const out = await this.session.run(feeds);
    const tokens = out[LOOP_OUTPUTS.tokens];
    const steps = tokens.dims[0];
    const tokenData = tokens.data as BigInt64Array;
    const size = this.metadata.num_layers * this.metadata.hidden_size;
    const means = this.measures ? (out[LOOP_OUTPUTS.responseMean].data as Float32Array) : new Float32Array(B * size);
    const counts = this.measures ? (out[LOOP_OUTPUTS.responseTokens].data as BigInt64Array) : new BigInt64Array(B);
    return jobs.map((_, b) => {
      const sampled: number[] = [];
      for (let i = 0; i < steps; i++) {
        const t = Number(tokenData[i * B + b]);
        if (t !== NO_TOKEN) sampled.push(t);
      }
      const stopped = sampled.length > 0 && this.rules.stopIds.has(sampled[sampled.length - 1]);
      return { responseIds: stopped ? sampled.slice(0, -1) : sampled, stopped, mean: means.slice(b * size, (b + 1) * size), counted: Number(counts[b]) };
    });
  }

  async close(): Promise<void> {
    await this.session.release();
  }
}

/**
 * The step-by-step loop: one run of the decoder graph per token for the whole batch, sampling
 * and sums on the host. It runs models split into stages (the hidden state goes from one
 * stage's session to the next, on its own device), and is the baseline the loop graph is
 * checked against.
 */
export class HostRunner implements BatchRunner {
  readonly kind = 'host';

  constructor(private readonly stages: DecoderSession[], private readonly rules: TokenRules) {}

  get placements(): Placement[] {
    return this.stages.map((s) => s.placement);
  }

  get metadata(): ModelMetadata {
    return this.stages[0].metadata;
  }

  /** Checks that the stages are one model's layers 0..L in order. */
  static fromStages(stages: DecoderSession[], rules: TokenRules): HostRunner {
    let next = 0;
    for (const s of stages) {
      const [first, end] = s.layers;
      if (first !== next) throw new ModelLoadError(`${s.dir}: holds layers ${first}:${end}, but the stages before it end at layer ${next}: list the stages in layer order with no gap`);
      if (s.metadata.hashes.config_sha256 !== stages[0].metadata.hashes.config_sha256) throw new ModelLoadError(`${s.dir}: built from another checkpoint's config than ${stages[0].dir}`);
      next = end;
    }
    if (next !== stages[0].metadata.num_layers) throw new ModelLoadError(`the stages end at layer ${next} of ${stages[0].metadata.num_layers}: the last stage is missing`);
    return new HostRunner(stages, rules);
  }

  /** One forward of every stage over the new columns: per-layer hidden states [B, S, d], last logits, new caches. */
  private async forward(ids: BigInt64Array, mask: BigInt64Array, positions: BigInt64Array, B: number, S: number, past: Record<string, ort.Tensor>[]) {
    const hidden: Float32Array[] = [];
    let logits: Float32Array | undefined;
    let carry: ort.Tensor = i64(ids, [B, S]);
    const T = mask.length / B;
    for (let k = 0; k < this.stages.length; k++) {
      const stage = this.stages[k];
      const [first, end] = stage.layers;
      const feeds: Record<string, ort.Tensor> = {
        [first === 0 ? 'input_ids' : `hidden_states.${first - 1}`]: carry,
        attention_mask: i64(mask, [B, T]),
        position_ids: i64(positions, [B, S]),
      };
      for (let l = first; l < end; l++) {
        feeds[`past_key_values.${l}.key`] = past[k][`present.${l}.key`] ?? past[k][`past_key_values.${l}.key`];
        feeds[`past_key_values.${l}.value`] = past[k][`present.${l}.value`] ?? past[k][`past_key_values.${l}.value`];
      }
      const out = await stage.session.run(feeds);
      for (let l = first; l < end; l++) hidden.push(out[`hidden_states.${l}`].data as Float32Array);
      const present: Record<string, ort.Tensor> = {};
      for (let l = first; l < end; l++) {
        present[`present.${l}.key`] = out[`present.${l}.key`];
        present[`present.${l}.value`] = out[`present.${l}.value`];
      }
      past[k] = present;
      if (end === stage.metadata.num_layers) logits = out.logits.data as Float32Array;
      else carry = out[`hidden_states.${end - 1}`];
    }
    return { hidden, logits: logits! };
  }

  async run(jobs: SequenceJob[]): Promise<SequenceResult[]> {
    const B = jobs.length;
    const { num_layers: L, hidden_size: d, vocab_size: V } = this.metadata;
    const { width, ids, mask, positions } = leftPad(jobs.map((j) => j.ids));
    const past = this.stages.map((s) => s.emptyBatchPast(B));
    const means = jobs.map(() => new ResponseMean(L, d));
    const weightedSums = jobs.map(() => new Float64Array(L * d));
    const weightTotals = jobs.map(() => 0);

    let out = await this.forward(ids, mask, positions, B, width, past);
    // Extract: the weighted answer positions of the prefill.
    jobs.forEach((j, b) => {
      if (!j.weights) return;
      const offset = width - j.ids.length;
      j.weights.forEach((w, i) => {
        if (!w) return;
        const pos = b * width + offset + i;
        for (let l = 0; l < L; l++) {
          const row = out.hidden[l].subarray(pos * d, (pos + 1) * d);
          for (let x = 0; x < d; x++) weightedSums[b][l * d + x] += w * row[x];
        }
        weightTotals[b] += w;
      });
    });

    const responses: number[][] = jobs.map(() => []);
    const stopped = jobs.map(() => false);
    let active = jobs.map((j) => j.maxNew > 0);
    let lastLogitsRow = (b: number) => out.logits.subarray((b * width + width - 1) * V, (b * width + width) * V);
    let maskNow = mask;
    let positionsNow = positions;
    for (;;) {
      const feeding = jobs.map(() => false);
      const nextIds = new BigInt64Array(B);
      jobs.forEach((j, b) => {
        if (!active[b]) return;
        const token = sampleToken(lastLogitsRow(b), j.temperature, j.topP, j.uniforms[responses[b].length]);
        if (this.rules.stopIds.has(token)) {
          stopped[b] = true;
          return;
        }
        responses[b].push(token);
        feeding[b] = true;
        nextIds[b] = BigInt(token);
      });
      if (!feeding.some(Boolean)) break;
      const T = maskNow.length / B;
      const grown = new BigInt64Array(B * (T + 1));
      const nextPositions = new BigInt64Array(B);
      for (let b = 0; b < B; b++) {
        grown.set(maskNow.subarray(b * T, (b + 1) * T), b * (T + 1));
        grown[b * (T + 1) + T] = feeding[b] ? 1n : 0n;
        nextPositions[b] = positionsNow[positionsNow.length / B * (b + 1) - 1] + 1n;
      }
      maskNow = grown;
      positionsNow = nextPositions;
      out = await this.forward(nextIds, maskNow, positionsNow, B, 1, past);
      const step = out;
      jobs.forEach((_, b) => {
        if (!feeding[b]) return;
        const token = responses[b][responses[b].length - 1];
        means[b].add(this.rules.tokenKind(token), (l) => step.hidden[l].subarray(b * d, (b + 1) * d));
      });
      active = jobs.map((j, b) => feeding[b] && responses[b].length < j.maxNew);
      lastLogitsRow = (b: number) => step.logits.subarray(b * V, (b + 1) * V);
    }
    return jobs.map((j, b) => {
      if (j.weights) {
        const total = weightTotals[b];
        const mean = new Float32Array(L * d);
        if (total) for (let i = 0; i < mean.length; i++) mean[i] = weightedSums[b][i] / total;
        return { responseIds: [], stopped: false, mean, counted: total };
      }
      return { responseIds: responses[b], stopped: stopped[b], mean: means[b].mean(), counted: means[b].tokens };
    });
  }

  async close(): Promise<void> {
    for (const s of this.stages) await s.session.release();
  }
}

/** The kind table the generation graph reads, from the host's per-token rules. */
export function kindTable(vocab: number, kind: (id: number) => TokenKind): BigInt64Array {
  const table = new BigInt64Array(vocab);
  for (let id = 0; id < vocab; id++) table[id] = BigInt(TOKEN_KIND[kind(id)]);
  return table;
}

export function describePlacements(placements: Placement[]): string {
  return placements.map(placementName).join(',');
}
