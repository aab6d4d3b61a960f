import type { CheckpointReader, HfConfig } from '../checkpoint';
import { CheckpointError } from '../checkpoint';
import { JOIN_INPUTS, JOIN_OUTPUTS, STEERING_INPUTS, STEP_INPUTS, STEP_OUTPUTS } from '../../contracts/modelDirectory';
import { DataType, GraphBuilder, MS_DOMAIN, STORAGE_TYPES } from '../graph';
import { candidatesOf, sampleTokens, sampleTokensAndCandidates } from '../sampler';

export interface DecoderDims {
  numLayers: number;
  hidden: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  intermediate: number;
  vocab: number;
  eps: number;
  ropeTheta: number;
}

export interface BuildOptions {
  /** Emit `hidden_states.{l}` outputs (the post-block residual stream of every layer built). */
  capture: boolean;
  /** Build layers [first, end) only: one stage of a model split over several devices. */
  layers?: [number, number];
  /** Take interventions after each block (STEERING_INPUTS): the step graph (not the portable one, which other tools run, nor the generation graph's Loop body). */
  steering?: boolean;
  /** The step graph's last stage: each row's this many most probable ids for a host that samples (STEP_OUTPUTS.candidateProbs); 0 or absent: none. */
  candidates?: number;
  /** The step graph of a whole model: take a joining row beside the decoding rows (JOIN_INPUTS). */
  join?: boolean;
}

/**
 * Which graph a builder writes. `portable`: the layout transformers.js and other ONNX decoder
 * tools run (attention from plain operators, a KV cache that grows by Concat, float32
 * arithmetic whatever the weights' storage). `step`: the engine's graph (onnxruntime's
 * GroupQueryAttention reading and writing one fixed-size KV buffer per layer in place;
 * arithmetic in the weights' precision, float32 only where Hugging Face uses it).
 */
export type GraphKind = 'portable' | 'step';

/** Graph input and output names: the convention of other ONNX decoder tools, plus hidden states. */
export interface DecoderNames {
  inputIds: string;
  attentionMask: string;
  positionIds: string;
  seqlensK: string;
  totalSequenceLength: string;
  logitsPositions: string;
  pastKey(l: number): string;
  pastValue(l: number): string;
  logits: string;
  presentKey(l: number): string;
  presentValue(l: number): string;
  /** Output of decoder block l; also the input of a stage that starts at layer l + 1. */
  hiddenState(l: number): string;
}

/** The step graph's names are the contract's (services/contracts/modelDirectory.ts); the portable graph adds attention_mask. */
export const NAMES: DecoderNames = { ...STEP_INPUTS, ...STEP_OUTPUTS, attentionMask: 'attention_mask' };

/** The same names under a prefix: the decoder inside another graph's subgraph (ONNX names may not shadow). */
export function prefixedNames(prefix: string): DecoderNames {
  return {
    inputIds: `${prefix}${NAMES.inputIds}`,
    attentionMask: `${prefix}${NAMES.attentionMask}`,
    positionIds: `${prefix}${NAMES.positionIds}`,
    seqlensK: `${prefix}${NAMES.seqlensK}`,
    totalSequenceLength: `${prefix}${NAMES.totalSequenceLength}`,
    logitsPositions: `${prefix}${NAMES.logitsPositions}`,
    pastKey: (l) => `${prefix}${NAMES.pastKey(l)}`,
    pastValue: (l) => `${prefix}${NAMES.pastValue(l)}`,
    logits: `${prefix}${NAMES.logits}`,
    presentKey: (l) => `${prefix}${NAMES.presentKey(l)}`,
    presentValue: (l) => `${prefix}${NAMES.presentValue(l)}`,
    hiddenState: (l) => `${prefix}${NAMES.hiddenState(l)}`,
  };
}

/** What one pass of the decoder produces, as value names in the graph being built. */
export interface DecoderValues {
  /** Output of each block built, [B, S, hidden]. */
  hidden: string[];
  /** [B, S, vocab], when the last layer is built. */
  logits?: string;
}

export interface GraphSignature {
  inputs: string[];
  outputs: string[];
  hiddenStateOutputs: string[];
  layers: [number, number];
  /** The step graph keeps running sums (STEP_INPUTS.responseSums): a step graph built with capture. */
  responseSums?: boolean;
  /** The step graph samples each row's next token (STEP_OUTPUTS.nextTokens): its last stage. */
  sampling?: boolean;
  /** The graph takes interventions (STEERING_INPUTS). */
  steering?: boolean;
  /** The step graph gives each row's this many most probable ids (STEP_OUTPUTS.candidateProbs, candidateIds). */
  candidates?: number;
  /** The step graph takes a joining row (JOIN_INPUTS). */
  join?: boolean;
}

/**
 * A step graph with a joining row runs the tokens of its decoding rows [B, S] and of the
 * joining row [1, J] as one sequence [1, B*S + J] through everything that treats tokens alike
 * (embedding, norms, matrix products, rotary); attention, interventions, sums and the head take
 * each part apart.
 */
interface Lanes {
  /** [2] int64: B and S of the decoding rows. */
  decodeShape: string;
  /** [1] int64: B * S. */
  decodeTokens: string;
  /** bool scalar: J > 0. */
  joining: string;
  /** [B*S + J] int64: each token's row (the joining row's is B), for the rows' interventions. */
  tokenRows: string;
}

/** Values built once per graph and used by every layer. */
export interface Shared {
  /** Rotary tables in the activations' type: [B, 1, S, headDim] (portable, heads first) or [B, S, 1, headDim] (step). */
  cos: string;
  sin: string;
  /** [B, S] as a 1-D int64 shape, for reshaping [B*S, n] back to [B, S, n]. */
  batchAndSequence: string;
  /** Portable graph only: the masks (step attention masks inside GroupQueryAttention). */
  masks?: {
    /** Additive attention bias [B, 1, S, T]: causal and padding. */
    bias: string;
    /** Query and key positions ([S, 1] and [1, T], int64). */
    queryPositions: string;
    keyPositions: string;
    /** Boolean [B, 1, S, T]: causal and not padding. */
    allowed: string;
  };
}

export interface BuilderOptions {
  names?: DecoderNames;
  kind?: GraphKind;
}

/** The most negative float32, as Hugging Face masks with: a fully masked row (a padding query) stays finite. */
export const MASKED = -3.4028234663852886e38;

/**
 * The decoder-only transformer every supported architecture shares, written as Llama:
 * pre-norm RMSNorm, rotary attention with grouped KV heads, gated SiLU MLP. An architecture
 * is a subclass that overrides the pieces that differ. Semantics follow Hugging Face's
 * modeling code. Weights keep Hugging Face's layout ([out, in]; projections are Gemm with
 * transB) so they stream from the checkpoint to the data file without being held in memory.
 */
export class DecoderBuilder {
  readonly dims: DecoderDims;
  readonly kind: GraphKind;
  /** The activations' element type: float32 in the portable graph, the weights' precision in the step graph. */
  protected readonly act: (typeof DataType)[keyof typeof DataType];
  protected readonly names: DecoderNames;
  private shared!: Shared;
  /** Set while building a step graph with a joining row. */
  private lanes: Lanes | undefined;
  private readonly slidingBiases = new Map<number, string>();

  constructor(protected readonly config: HfConfig, protected readonly ckpt: CheckpointReader, protected readonly g: GraphBuilder, opts: BuilderOptions = {}) {
    this.names = opts.names ?? NAMES;
    this.kind = opts.kind ?? 'portable';
    this.act = this.kind === 'step' ? STORAGE_TYPES[g.storage] : DataType.FLOAT;
    if (this.kind === 'step' && g.castWeights) throw new Error('a step graph uses its weights as stored: build it with a GraphBuilder that does not cast them');
    const heads = config.num_attention_heads;
    this.dims = {
      numLayers: config.num_hidden_layers,
      hidden: config.hidden_size,
      heads,
      kvHeads: config.num_key_value_heads ?? heads,
      headDim: config.head_dim ?? config.hidden_size / heads,
      intermediate: config.intermediate_size,
      vocab: config.vocab_size,
      eps: config.rms_norm_eps,
      ropeTheta: config.rope_theta ?? 10000,
    };
    if (!Number.isInteger(this.dims.headDim)) throw new CheckpointError(`config.json: hidden_size ${config.hidden_size} is not a multiple of num_attention_heads ${heads} (and no head_dim is given)`);
    if (heads % this.dims.kvHeads !== 0) throw new CheckpointError(`config.json: num_attention_heads ${heads} is not a multiple of num_key_value_heads ${this.dims.kvHeads}`);
    if (typeof this.dims.eps !== 'number') throw new CheckpointError('config.json: "rms_norm_eps" is missing');
  }

  protected layerPrefix(l: number): string {
    return `model.layers.${l}`;
  }

  // ---------- the pieces an architecture may override ----------

  /** Rotary inverse frequencies [headDim / 2], float32 as Hugging Face computes them. */
  protected inverseFrequencies(): Float32Array {
    const { headDim, ropeTheta } = this.dims;
    const out = new Float32Array(headDim / 2);
    for (let i = 0; i < out.length; i++) out[i] = 1 / Math.pow(ropeTheta, (2 * i) / headDim);
    return out;
  }

  /** Token embeddings [B, S, D]. */
  protected async embed(inputIds: string): Promise<string> {
    return this.g.node('Gather', [await this.embeddingTable(), inputIds], { axis: 0 });
  }

  /**
   * RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * w, in float32 (as Hugging Face
   * computes the statistics; the weight, stored in float32, is applied before the result is
   * rounded to the activations' type).
   */
  protected async norm(x: string, weightName: string, size = this.dims.hidden): Promise<string> {
    return this.toAct(this.g.node('Mul', [this.normalize(this.toFloat(x)), await this.normWeight(weightName, size)]));
  }

  protected hasQkvBias(): boolean {
    return this.config.attention_bias === true;
  }

  /** Per-head transform of queries and keys ([B, heads, S, headDim]) before rotary: none for Llama. */
  protected async queryKeyNorm(_l: number, q: string, k: string): Promise<[string, string]> {
    return [q, k];
  }

  protected attentionScale(): number {
    return 1 / Math.sqrt(this.dims.headDim);
  }

  /** Soft cap of the scaled attention scores (tanh(s / cap) * cap), or none: none for Llama. */
  protected attentionSoftcap(): number | undefined {
    return undefined;
  }

  /** Layer l attends only to the `window` latest positions (itself included), or to all: all for Llama. */
  protected slidingWindow(_l: number): number | undefined {
    return undefined;
  }

  /** The MLP's activation: SiLU for Llama. */
  protected activation(x: string): string {
    return this.g.node('Mul', [x, this.g.node('Sigmoid', [x])]);
  }

  /** One decoder block: residual + attention(norm(x)), then residual + mlp(norm(x)). */
  protected async block(l: number, h: string): Promise<string> {
    const p = this.layerPrefix(l);
    const h1 = this.g.node('Add', [h, await this.attention(l, await this.norm(h, `${p}.input_layernorm.weight`))]);
    return this.g.node('Add', [h1, await this.mlp(l, await this.norm(h1, `${p}.post_attention_layernorm.weight`))]);
  }

  /** A transform of the final logits: none for Llama. */
  protected logitsTransform(logits: string): string {
    return logits;
  }

  // ---------- helpers for subclasses ----------

  /** x / sqrt(mean(x^2) + eps) over the last axis (float32 in, float32 out). */
  protected normalize(x: string): string {
    const g = this.g;
    const ms = g.node('ReduceMean', [g.node('Mul', [x, x])], { axes: [-1], keepdims: 1 });
    return g.node('Div', [x, g.node('Sqrt', [g.node('Add', [ms, g.constFloat([this.dims.eps], [])])])]);
  }

  /** A checkpoint tensor as a graph weight, streamed (in the activations' type). */
  protected param(name: string, shape: number[]): Promise<string> {
    return this.g.weight(name, this.ckpt.chunks(name, shape), shape);
  }

  /** A norm's weight [size], stored in float32 (the norms compute in float32; a fraction of a percent of the bytes). */
  protected normWeight(name: string, size: number): Promise<string> {
    return this.g.weight(name, this.ckpt.chunks(name, [size]), [size], 'f32');
  }

  /** A scalar constant in the activations' type. */
  protected scalar(value: number): string {
    return this.g.constOf([value], [], this.act);
  }

  /** x in float32 (a Cast when the activations are half precision). */
  protected toFloat(x: string): string {
    return this.act === DataType.FLOAT ? x : this.g.node('Cast', [x], { to: DataType.FLOAT });
  }

  /** A float32 x in the activations' type. */
  protected toAct(x: string): string {
    return this.toActIn(this.g, x);
  }

  /** The same in a subgraph being built. */
  protected toActIn(g: GraphBuilder, x: string): string {
    return this.act === DataType.FLOAT ? x : g.node('Cast', [x], { to: this.act });
  }

  /** tanh(x / cap) * cap. */
  protected softcap(x: string, cap: number): string {
    const g = this.g;
    return g.node('Mul', [g.node('Tanh', [g.node('Div', [x, this.scalar(cap)])]), this.scalar(cap)]);
  }

  /** x [B, S, in] times a Hugging Face Linear `name` ([out, in], optional bias) -> [B, S, out]. */
  protected async linear(x: string, name: string, outFeatures: number, inFeatures: number, bias = false): Promise<string> {
    const w = await this.param(`${name}.weight`, [outFeatures, inFeatures]);
    return this.project(x, w, outFeatures, inFeatures, bias ? await this.param(`${name}.bias`, [outFeatures]) : undefined);
  }

  protected project(x: string, weight: string, outFeatures: number, inFeatures: number, bias?: string): string {
    const g = this.g;
    const rows = g.node('Reshape', [x, g.constInt64([-1, inFeatures])]);
    const y = g.node('Gemm', bias ? [rows, weight, bias] : [rows, weight], { transB: 1 });
    // allowzero: the dims are real ones (from Shape), and a step graph's head may run no position at all.
    return g.node('Reshape', [y, g.node('Concat', [this.shared.batchAndSequence, g.constInt64([outFeatures])], { axis: 0 })], { allowzero: 1 });
  }

  // ---------- shared structure ----------

  private embeddingTableName: string | undefined;

  /** The embedding table as a graph value, added once (the head reuses it when embeddings are tied). */
  protected async embeddingTable(): Promise<string> {
    this.embeddingTableName ??= await this.param('model.embed_tokens.weight', [this.dims.vocab, this.dims.hidden]);
    return this.embeddingTableName;
  }

  protected tiedEmbeddings(): boolean {
    return this.config.tie_word_embeddings === true || (this.config.tie_word_embeddings === undefined && !this.ckpt.has('lm_head.weight'));
  }

  /** Gated MLP: down(act(gate(x)) * up(x)). */
  protected async mlp(l: number, x: string): Promise<string> {
    const p = `${this.layerPrefix(l)}.mlp`;
    const { hidden, intermediate } = this.dims;
    const gate = await this.linear(x, `${p}.gate_proj`, intermediate, hidden);
    const up = await this.linear(x, `${p}.up_proj`, intermediate, hidden);
    return this.linear(this.g.node('Mul', [this.activation(gate), up]), `${p}.down_proj`, hidden, intermediate);
  }

  protected attention(l: number, x: string): Promise<string> {
    return this.kind === 'step' ? this.attentionStep(l, x) : this.attentionPortable(l, x);
  }

  /** Attention from plain operators: the cache grows by Concat; scores, soft cap and masks in the graph. */
  private async attentionPortable(l: number, x: string): Promise<string> {
    const g = this.g;
    const p = `${this.layerPrefix(l)}.self_attn`;
    const { hidden, heads, kvHeads, headDim } = this.dims;
    const bias = this.hasQkvBias();
    const toHeads = (v: string, n: number) => g.node('Transpose', [g.node('Reshape', [v, g.constInt64([0, 0, n, headDim])])], { perm: [0, 2, 1, 3] });
    let q = toHeads(await this.linear(x, `${p}.q_proj`, heads * headDim, hidden, bias), heads);
    let k = toHeads(await this.linear(x, `${p}.k_proj`, kvHeads * headDim, hidden, bias), kvHeads);
    const v = toHeads(await this.linear(x, `${p}.v_proj`, kvHeads * headDim, hidden, bias), kvHeads);
    [q, k] = await this.queryKeyNorm(l, q, k);
    q = this.rotary(q);
    k = this.rotary(k);
    const presentK = g.node('Concat', [this.names.pastKey(l), k], { axis: 2 }, this.names.presentKey(l));
    const presentV = g.node('Concat', [this.names.pastValue(l), v], { axis: 2 }, this.names.presentValue(l));
    const kAll = this.repeatKv(presentK);
    const vAll = this.repeatKv(presentV);
    let scores = g.node('Mul', [g.node('MatMul', [q, g.node('Transpose', [kAll], { perm: [0, 1, 3, 2] })]), this.scalar(this.attentionScale())]);
    const cap = this.attentionSoftcap();
    if (cap) scores = this.softcap(scores, cap);
    const probs = g.node('Softmax', [g.node('Add', [scores, this.maskOf(l)])], { axis: -1 });
    const ctx = g.node('Transpose', [g.node('MatMul', [probs, vAll])], { perm: [0, 2, 1, 3] });
    return this.linear(g.node('Reshape', [ctx, g.constInt64([0, 0, heads * headDim])]), `${p}.o_proj`, hidden, heads * headDim);
  }

  /**
   * Attention by onnxruntime's GroupQueryAttention over this layer's KV buffer [B, kvHeads,
   * max_length, headDim]: past and present are bound to the same buffer, the step's keys and
   * values are written at each row's filled length (seqlens_k), and the kernel applies the
   * causal mask, the soft cap and the sliding window. Rotary (and Qwen 3's q/k norms before it)
   * is applied here, so the kernel's own rotary is off.
   */
  private async attentionStep(l: number, x: string): Promise<string> {
    const g = this.g;
    const p = `${this.layerPrefix(l)}.self_attn`;
    const { hidden, heads, kvHeads, headDim } = this.dims;
    const bias = this.hasQkvBias();
    const toHeads = (v: string, n: number) => g.node('Reshape', [v, g.constInt64([0, 0, n, headDim])]);
    const fromHeads = (v: string, n: number) => g.node('Reshape', [v, g.constInt64([0, 0, n * headDim])]);
    let q = toHeads(await this.linear(x, `${p}.q_proj`, heads * headDim, hidden, bias), heads);
    let k = toHeads(await this.linear(x, `${p}.k_proj`, kvHeads * headDim, hidden, bias), kvHeads);
    const v = await this.linear(x, `${p}.v_proj`, kvHeads * headDim, hidden, bias);
    [q, k] = await this.queryKeyNorm(l, q, k);
    q = fromHeads(this.rotary(q), heads);
    k = fromHeads(this.rotary(k), kvHeads);
    const attrs: Record<string, number | { float: number }> = { num_heads: heads, kv_num_heads: kvHeads, scale: { float: this.attentionScale() } };
    const cap = this.attentionSoftcap();
    if (cap) attrs.softcap = { float: cap };
    const window = this.slidingWindow(l);
    // local_window_size = the window itself (itself included), as onnxruntime-genai's builder
    // sets it; the step-graph tests check it against the reference's Hugging Face semantics.
    if (window) attrs.local_window_size = window;
    const gqa = (b: GraphBuilder, qkv: string[], past: string[], lengths: string[], outputs: string[]) => b.nodeNamed('GroupQueryAttention', [...qkv, ...past, ...lengths], outputs, attrs, MS_DOMAIN);
    const decodePast = [this.names.pastKey(l), this.names.pastValue(l)];
    const decodeLengths = [this.names.seqlensK, this.names.totalSequenceLength];
    const decodePresent = [this.names.presentKey(l), this.names.presentValue(l)];
    if (!this.lanes) {
      const out = g.fresh('attention');
      gqa(g, [q, k, v], decodePast, decodeLengths, [out, ...decodePresent]);
      return this.linear(out, `${p}.o_proj`, hidden, heads * headDim);
    }
    // Each part over its own slots: the decoding rows as before, the joining row (when there is
    // one: onnxruntime's CPU kernel runs several tokens after a past only at batch 1) over its slot.
    const decodeOut = g.fresh('attention');
    gqa(g, [q, k, v].map((x) => this.decodePart(x)), decodePast, decodeLengths, [decodeOut, ...decodePresent]);
    const [jq, jk, jv] = [q, k, v].map((x) => this.joinPart(x));
    const joinPast = [JOIN_INPUTS.pastKey(l), JOIN_INPUTS.pastValue(l)];
    const kvDims = [1, kvHeads, 'join_length', headDim];
    const on = g.child();
    const onOut = on.fresh('join_attention');
    const onPresent = [on.fresh('join_present_key'), on.fresh('join_present_value')];
    gqa(on, [jq, jk, jv], joinPast, [JOIN_INPUTS.seqlensK, JOIN_INPUTS.totalSequenceLength], [onOut, ...onPresent]);
    on.output(onOut, on.fresh('join_attention_out'), this.act, [1, 'join_tokens', heads * headDim]);
    onPresent.forEach((x, i) => on.output(x, on.fresh(i ? 'join_present_value_out' : 'join_present_key_out'), this.act, kvDims));
    const off = g.child();
    // No joining row: no tokens (the queries' empty part has the attention output's width), its buffers as they were.
    off.output(off.node('Identity', [jq]), off.fresh('no_join_attention'), this.act, [1, 'join_tokens', heads * headDim]);
    joinPast.forEach((x, i) => off.output(off.node('Identity', [x]), off.fresh(i ? 'no_join_value' : 'no_join_key'), this.act, kvDims));
    const joinOut = g.fresh('join_attention');
    g.nodeNamed('If', [this.lanes.joining], [joinOut, JOIN_OUTPUTS.presentKey(l), JOIN_OUTPUTS.presentValue(l)], { then_branch: { graph: on.subgraph(`join_attention_${l}`) }, else_branch: { graph: off.subgraph(`no_join_attention_${l}`) } });
    const out = g.node('Concat', [g.node('Reshape', [decodeOut, g.constInt64([1, -1, heads * headDim])]), joinOut], { axis: 1 });
    return this.linear(out, `${p}.o_proj`, hidden, heads * headDim);
  }

  /** The decoding rows' part of a joined sequence [1, T, ...] as [B, S, ...]. */
  protected decodePart(x: string): string {
    const g = this.g;
    const lanes = this.lanes!;
    const tokens = g.node('Slice', [x, g.constInt64([0]), lanes.decodeTokens, g.constInt64([1])]);
    return g.node('Reshape', [tokens, g.node('Concat', [lanes.decodeShape, g.constInt64([-1])], { axis: 0 })]);
  }

  /** The joining row's part of a joined sequence [1, T, n] as [1, J, n]. */
  protected joinPart(x: string): string {
    const g = this.g;
    return g.node('Slice', [x, this.lanes!.decodeTokens, g.constInt64([Number.MAX_SAFE_INTEGER]), g.constInt64([1])]);
  }

  /** The additive mask of layer l (portable graph): causal and padding, and the sliding window where the layer has one. */
  private maskOf(l: number): string {
    const masks = this.shared.masks!;
    const window = this.slidingWindow(l);
    if (!window) return masks.bias;
    let bias = this.slidingBiases.get(window);
    if (!bias) {
      // A key is visible when it is fewer than `window` positions behind the query.
      const g = this.g;
      const near = g.node('Less', [g.node('Sub', [masks.queryPositions, masks.keyPositions]), g.constInt64([window], [])]);
      bias = g.node('Where', [g.node('And', [masks.allowed, near]), g.constFloat([0], []), g.constFloat([MASKED], [])]);
      this.slidingBiases.set(window, bias);
    }
    return bias;
  }

  /** Grouped-query attention: each KV head serves heads / kvHeads query heads. */
  private repeatKv(x: string): string {
    const { heads, kvHeads, headDim } = this.dims;
    if (heads === kvHeads) return x;
    const g = this.g;
    const expanded = g.node('Expand', [g.node('Unsqueeze', [x, g.constInt64([2])]), g.constInt64([1, 1, heads / kvHeads, 1, 1])]);
    return g.node('Reshape', [expanded, g.constInt64([0, heads, -1, headDim])]);
  }

  /** x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1]. */
  private rotary(x: string): string {
    const g = this.g;
    const half = this.dims.headDim / 2;
    const [x1, x2] = g.nodeN('Split', [x, g.constInt64([half, half])], 2, { axis: -1 });
    const rotated = g.node('Concat', [g.node('Neg', [x2]), x1], { axis: -1 });
    return g.node('Add', [g.node('Mul', [x, this.shared.cos]), g.node('Mul', [rotated, this.shared.sin])]);
  }

  /**
   * Rotary tables from position_ids (computed in float32, then rounded to the activations'
   * type, as Hugging Face does); in the portable graph also the causal + padding mask from
   * attention_mask.
   */
  private sharedValues(positionIds = this.names.positionIds): Shared {
    const g = this.g;
    const pos = g.node('Unsqueeze', [g.node('Cast', [positionIds], { to: DataType.FLOAT }), g.constInt64([2])]);
    const freqs = g.node('Mul', [pos, g.constFloat(this.inverseFrequencies())]);
    const emb = g.node('Concat', [freqs, freqs], { axis: -1 });
    // [B, S, headDim] -> heads first [B, 1, S, headDim] (portable) or [B, S, 1, headDim] (step).
    const headAxis = this.kind === 'step' ? 2 : 1;
    const cos = this.toAct(g.node('Unsqueeze', [g.node('Cos', [emb]), g.constInt64([headAxis])]));
    const sin = this.toAct(g.node('Unsqueeze', [g.node('Sin', [emb]), g.constInt64([headAxis])]));
    const positionShape = g.node('Shape', [positionIds]);
    if (this.kind === 'step') return { cos, sin, batchAndSequence: positionShape };

    const S = g.node('Gather', [positionShape, g.constInt64([1], [])], { axis: 0 });
    const T = g.node('Gather', [g.node('Shape', [this.names.attentionMask]), g.constInt64([1], [])], { axis: 0 });
    const one = g.constInt64([1], []);
    const keyPositions = g.node('Unsqueeze', [g.node('Range', [g.constInt64([0], []), T, one]), g.constInt64([0])]);
    const queryPositions = g.node('Unsqueeze', [g.node('Range', [g.node('Sub', [T, S]), T, one]), g.constInt64([1])]);
    const causal = g.node('LessOrEqual', [keyPositions, queryPositions]);
    const notPadding = g.node('Unsqueeze', [g.node('Equal', [this.names.attentionMask, g.constInt64([1], [])]), g.constInt64([1, 2])]);
    const allowed = g.node('And', [causal, notPadding]);
    const bias = g.node('Where', [allowed, g.constFloat([0], []), g.constFloat([MASKED], [])]);
    return { cos, sin, batchAndSequence: positionShape, masks: { bias, queryPositions, keyPositions, allowed } };
  }

  /**
   * The blocks [first, end) (and the head, when end is the last layer) over values already in
   * the graph: token ids (or, for a later stage, the previous stage's hidden state), and the
   * attention mask (portable), position ids and past keys and values under `this.names`. The
   * present keys and values are named `this.names.presentKey/Value(l)`. The step graph's head
   * reads only the positions `logitsPositions` names ([B, K, vocab] instead of [B, S, vocab]).
   */
  async forward(inputIds: string | undefined, inputHidden: string | undefined, [first, end]: [number, number], steering = false): Promise<DecoderValues> {
    const g = this.g;
    let ids = inputIds;
    let positions = this.names.positionIds;
    if (this.lanes) {
      // One sequence of the decoding rows' tokens, then the joining row's.
      const flat = (x: string) => g.node('Reshape', [x, g.constInt64([1, -1])]);
      ids = g.node('Concat', [flat(inputIds!), JOIN_INPUTS.inputIds], { axis: 1 });
      positions = g.node('Concat', [flat(this.names.positionIds), JOIN_INPUTS.positionIds], { axis: 1 });
    }
    this.shared = this.sharedValues(positions);
    let h = ids !== undefined ? await this.embed(ids) : inputHidden!;
    const hidden: string[] = [];
    for (let l = first; l < end; l++) {
      h = await this.block(l, h);
      if (steering) h = this.steer(l - first, h);
      hidden.push(h);
    }
    if (end < this.dims.numLayers) return { hidden };
    let last = h;
    if (this.kind === 'step') {
      last = g.node('Gather', [this.lanes ? this.decodePart(h) : h, this.names.logitsPositions], { axis: 1 });
      if (this.lanes) {
        // The joining row's last position after the decoding rows' (with one position each).
        const on = g.child();
        const joinLast = on.node('Reshape', [on.node('Slice', [this.joinPart(h), on.constInt64([-1]), on.constInt64([Number.MAX_SAFE_INTEGER]), on.constInt64([1])]), on.constInt64([1, 1, this.dims.hidden])]);
        on.output(on.node('Concat', [last, joinLast], { axis: 0 }), on.fresh('rows_joined'), this.act, ['rows', 'logits_count', this.dims.hidden]);
        const off = g.child();
        off.output(off.node('Identity', [last]), off.fresh('rows_decoding'), this.act, ['rows', 'logits_count', this.dims.hidden]);
        const rows = g.fresh('rows');
        g.nodeNamed('If', [this.lanes.joining], [rows], { then_branch: { graph: on.subgraph('head_rows_joined') }, else_branch: { graph: off.subgraph('head_rows') } });
        last = rows;
      }
      this.shared.batchAndSequence = g.node('Shape', [last], { end: 2 });
    }
    const normed = await this.norm(last, 'model.norm.weight');
    const weight = this.tiedEmbeddings() ? await this.embeddingTable() : await this.param('lm_head.weight', [this.dims.vocab, this.dims.hidden]);
    return { hidden, logits: this.logitsTransform(this.project(normed, weight, this.dims.vocab, this.dims.hidden)) };
  }

  /**
   * The interventions after a block (STEERING_INPUTS): row b's h <- h - u (beta relu(<h, u> -
   * tau) + gamma <h, u>) + a, in the activations' type, inside an If on `steer` so that a run
   * without any costs one branch per layer. `index`: the layer's place among those built.
   */
  private steer(index: number, h: string): string {
    const g = this.g;
    const on = g.child();
    const at = on.constInt64([index], []);
    // Each row's values over its tokens: [B, 1, n], or with a joining row [1, T, n] by each token's row.
    const lanes = this.lanes;
    const row = (name: string) => {
      const perRow = on.node('Gather', [name, at], { axis: 0 });
      return this.toActIn(on, lanes ? on.node('Unsqueeze', [on.node('Gather', [perRow, lanes.tokenRows], { axis: 0 }), on.constInt64([0])]) : on.node('Unsqueeze', [perRow, on.constInt64([1])]));
    };
    const unit = row(STEERING_INPUTS.unit); // [B, 1, hidden]
    const add = row(STEERING_INPUTS.add);
    const params = row(STEERING_INPUTS.params); // [B, 1, 3]
    const [beta, tau, gamma] = on.nodeN('Split', [params, on.constInt64([1, 1, 1])], 3, { axis: 2 }); // [B, 1, 1] each
    const p = on.node('ReduceSum', [on.node('Mul', [h, unit]), on.constInt64([-1])], { keepdims: 1 }); // [B, S, 1]
    const amount = on.node('Add', [on.node('Mul', [beta, on.node('Relu', [on.node('Sub', [p, tau])])]), on.node('Mul', [gamma, p])]);
    const steered = on.node('Add', [on.node('Sub', [h, on.node('Mul', [amount, unit])]), add]);
    on.output(steered, on.fresh('steered'), this.act, ['batch_size', 'sequence_length', this.dims.hidden]);
    const off = g.child();
    off.output(off.node('Identity', [h]), off.fresh('unsteered'), this.act, ['batch_size', 'sequence_length', this.dims.hidden]);
    const out = g.fresh('block_out');
    g.nodeNamed('If', [STEERING_INPUTS.on], [out], { then_branch: { graph: on.subgraph(`steer_${index}`) }, else_branch: { graph: off.subgraph(`no_steer_${index}`) } });
    return out;
  }

  /** Declares the inputs, builds the blocks (and, in the last stage, the head), declares the outputs. */
  async build(opts: BuildOptions): Promise<GraphSignature> {
    const g = this.g;
    const { numLayers, kvHeads, headDim, hidden, vocab } = this.dims;
    const [first, end] = opts.layers ?? [0, numLayers];
    if (!(Number.isInteger(first) && Number.isInteger(end) && first >= 0 && first < end && end <= numLayers)) {
      throw new CheckpointError(`--layers: ${first}:${end} is not a range within the model's ${numLayers} layers`);
    }
    const step = this.kind === 'step';
    // Inputs and outputs other than the KV buffers are float32 (what onnxruntime-node can pass); arithmetic is in `act`.
    const h0 = first === 0 ? g.input(this.names.inputIds, DataType.INT64, ['batch_size', 'sequence_length']) : g.input(this.names.hiddenState(first - 1), DataType.FLOAT, ['batch_size', 'sequence_length', hidden]);
    if (!step) g.input(this.names.attentionMask, DataType.INT64, ['batch_size', 'total_sequence_length']);
    g.input(this.names.positionIds, DataType.INT64, ['batch_size', 'sequence_length']);
    if (step) {
      g.input(this.names.seqlensK, DataType.INT32, ['batch_size']);
      g.input(this.names.totalSequenceLength, DataType.INT32, []);
      if (end === numLayers) g.input(this.names.logitsPositions, DataType.INT64, ['logits_count']);
    }
    const kvType = step ? this.act : DataType.FLOAT;
    const pastLength = step ? 'max_length' : 'past_sequence_length';
    for (let l = first; l < end; l++) {
      g.input(this.names.pastKey(l), kvType, ['batch_size', kvHeads, pastLength, headDim]);
      g.input(this.names.pastValue(l), kvType, ['batch_size', kvHeads, pastLength, headDim]);
    }
    // A joining row: the step graph of a whole model (a stage's rows come from another stage).
    const join = step && !!opts.join && first === 0 && end === numLayers;
    this.lanes = undefined;
    if (join) {
      g.input(JOIN_INPUTS.inputIds, DataType.INT64, [1, 'join_tokens']);
      g.input(JOIN_INPUTS.positionIds, DataType.INT64, [1, 'join_tokens']);
      g.input(JOIN_INPUTS.seqlensK, DataType.INT32, [1]);
      g.input(JOIN_INPUTS.totalSequenceLength, DataType.INT32, []);
      for (let l = first; l < end; l++) {
        g.input(JOIN_INPUTS.pastKey(l), kvType, [1, kvHeads, 'join_length', headDim]);
        g.input(JOIN_INPUTS.pastValue(l), kvType, [1, kvHeads, 'join_length', headDim]);
      }
      const decodeShape = g.node('Shape', [this.names.inputIds]);
      const joinTokens = g.node('Shape', [JOIN_INPUTS.inputIds], { start: 1, end: 2 });
      const decodeTokens = g.node('Shape', [g.node('Reshape', [this.names.inputIds, g.constInt64([-1])])]);
      const J = g.node('Squeeze', [joinTokens, g.constInt64([0])]);
      const at = (i: number) => g.node('Gather', [decodeShape, g.constInt64([i], [])], { axis: 0 });
      // Token t of the decoding rows is row t / S's; the joining row's tokens are row B's.
      const decodeRows = g.node('Div', [g.node('Range', [g.constInt64([0], []), g.node('Squeeze', [decodeTokens, g.constInt64([0])]), g.constInt64([1], [])]), at(1)]);
      const joinRows = g.node('Mul', [g.node('ConstantOfShape', [joinTokens], { value: GraphBuilder.tensor([1], [1], DataType.INT64) }), at(0)]);
      this.lanes = {
        decodeShape,
        decodeTokens,
        joining: g.node('Greater', [J, g.constInt64([0], [])]),
        tokenRows: g.node('Concat', [decodeRows, joinRows], { axis: 0 }),
      };
    }
    if (opts.steering) {
      g.input(STEERING_INPUTS.on, DataType.BOOL, []);
      g.input(STEERING_INPUTS.unit, DataType.FLOAT, ['steer_layers', 'steer_batch', hidden]);
      g.input(STEERING_INPUTS.add, DataType.FLOAT, ['steer_layers', 'steer_batch', hidden]);
      g.input(STEERING_INPUTS.params, DataType.FLOAT, ['steer_layers', 'steer_batch', 3]);
    }
    const values = await this.forward(first === 0 ? h0 : undefined, first === 0 ? undefined : this.toAct(h0), [first, end], opts.steering);
    const hiddenStateOutputs: string[] = [];
    const sums = step && opts.capture;
    // A row whose mix is all zeros starts afresh without reading its held sums (a selection,
    // not a product: whatever the buffer held, fresh memory or a previous item's overflow, stays out).
    const keepOf = (mix: string) => g.node('Greater', [g.node('ReduceMax', [g.node('Abs', [mix])], { axes: [1, 2], keepdims: 1 }), g.constFloat([0], [])]);
    // The slot's running sums stay beside its KV buffers: new = mix x held + weights x hidden,
    // two batched products, written over the held sums (the same buffer; the products read it
    // before the sum is written).
    const runningSums = (keep: string, mix: string, weights: string, held: string, h: string, out: string, rows: number | string) => {
      g.node('Add', [g.node('MatMul', [mix, g.node('Where', [keep, held, g.constFloat([0], [])])]), g.node('MatMul', [weights, h])], {}, out);
      g.output(out, out, DataType.FLOAT, [rows, 2, hidden]);
    };
    let keep = '';
    if (sums) {
      g.input(STEP_INPUTS.responseWeights, DataType.FLOAT, ['batch_size', 2, 'sequence_length']);
      g.input(STEP_INPUTS.sumsMix, DataType.FLOAT, ['batch_size', 2, 2]);
      keep = keepOf(STEP_INPUTS.sumsMix);
    }
    let joinKeep = '';
    if (sums && join) {
      g.input(JOIN_INPUTS.responseWeights, DataType.FLOAT, [1, 2, 'join_tokens']);
      g.input(JOIN_INPUTS.sumsMix, DataType.FLOAT, [1, 2, 2]);
      joinKeep = keepOf(JOIN_INPUTS.sumsMix);
    }
    for (let l = first; l < end; l++) {
      // A stage that is not the last hands its last hidden state on, capture or not.
      if (opts.capture || (l === end - 1 && end < numLayers)) {
        const h = this.toFloat(join ? this.decodePart(values.hidden[l - first]) : values.hidden[l - first]);
        g.output(h, this.names.hiddenState(l), DataType.FLOAT, ['batch_size', 'sequence_length', hidden]);
        if (opts.capture) hiddenStateOutputs.push(this.names.hiddenState(l));
        if (sums) {
          const held = g.input(STEP_INPUTS.responseSums(l), DataType.FLOAT, ['batch_size', 2, hidden]);
          runningSums(keep, STEP_INPUTS.sumsMix, STEP_INPUTS.responseWeights, held, h, STEP_OUTPUTS.responseSumsOut(l), 'batch_size');
          if (join) {
            // The joining row's sums, the same way over its slot's (no tokens: unchanged when the mix is the identity).
            const joinHeld = g.input(JOIN_INPUTS.responseSums(l), DataType.FLOAT, [1, 2, hidden]);
            runningSums(joinKeep, JOIN_INPUTS.sumsMix, JOIN_INPUTS.responseWeights, joinHeld, this.toFloat(this.joinPart(values.hidden[l - first])), JOIN_OUTPUTS.responseSumsOut(l), 1);
          }
        }
      }
    }
    let sampling = false;
    let candidates = 0;
    if (values.logits) {
      const logits = this.toFloat(values.logits);
      // With a joining row, the head's rows are the decoding rows and then it.
      const rowsDim = join ? 'rows' : 'batch_size';
      g.output(logits, this.names.logits, DataType.FLOAT, [rowsDim, step ? 'logits_count' : 'sequence_length', vocab]);
      if (step) {
        // Each row's next token, sampled in the graph from its last logits position when
        // `sample_in_graph` says so (on a GPU, so that a step's logits need not cross to the
        // host); otherwise the full sort is skipped (an If: on a CPU it costs more than the
        // host's partial sort of logits already in host memory) and the tokens are zeros.
        sampling = true;
        g.input(STEP_INPUTS.sampleInGraph, DataType.BOOL, []);
        for (const name of [STEP_INPUTS.temperature, STEP_INPUTS.topP, STEP_INPUTS.uniform]) g.input(name, DataType.FLOAT, [rowsDim]);
        // With `candidates` (k), both branches also give each row's k most probable ids: sliced
        // from the sampler's sort, or selected by a TopK of k (the host then samples from them).
        const k = Math.min(opts.candidates ?? 0, vocab);
        const withCandidates = (b: GraphBuilder, c: { probs: string; ids: string }) => {
          b.output(c.probs, b.fresh('candidate_probs'), DataType.FLOAT, ['batch_size', k]);
          b.output(c.ids, b.fresh('candidate_ids'), DataType.INT64, ['batch_size', k]);
        };
        const drawn = g.child();
        const last = drawn.node('Gather', [logits, drawn.constInt64([-1], [])], { axis: 1 });
        const params = [STEP_INPUTS.temperature, STEP_INPUTS.topP, STEP_INPUTS.uniform] as const;
        if (k) {
          const sampled = sampleTokensAndCandidates(drawn, last, ...params, k);
          drawn.output(sampled.tokens, drawn.fresh('drawn_tokens'), DataType.INT64, ['batch_size']);
          withCandidates(drawn, sampled);
        } else drawn.output(sampleTokens(drawn, last, ...params), drawn.fresh('drawn_tokens'), DataType.INT64, ['batch_size']);
        const skipped = g.child();
        skipped.output(skipped.node('ConstantOfShape', [skipped.node('Shape', [STEP_INPUTS.temperature])], { value: GraphBuilder.tensor([0], [1], DataType.INT64) }), skipped.fresh('no_tokens'), DataType.INT64, ['batch_size']);
        if (k) {
          // Only when some row samples (a temperature above 0): a step of greedy rows selects nothing (zeros).
          const select = skipped.child();
          withCandidates(select, candidatesOf(select, select.node('Gather', [logits, select.constInt64([-1], [])], { axis: 1 }), STEP_INPUTS.temperature, k));
          const none = skipped.child();
          const dims = none.node('Concat', [none.node('Shape', [STEP_INPUTS.temperature]), none.constInt64([k])], { axis: 0 });
          none.output(none.node('ConstantOfShape', [dims], { value: GraphBuilder.tensor([0], [1], DataType.FLOAT) }), none.fresh('no_candidate_probs'), DataType.FLOAT, ['batch_size', k]);
          none.output(none.node('ConstantOfShape', [dims], { value: GraphBuilder.tensor([0], [1], DataType.INT64) }), none.fresh('no_candidate_ids'), DataType.INT64, ['batch_size', k]);
          const anyHot = skipped.node('Greater', [skipped.node('ReduceMax', [STEP_INPUTS.temperature], { keepdims: 0 }), skipped.constFloat([0], [])]);
          const [probs, ids] = [skipped.fresh('candidate_probs'), skipped.fresh('candidate_ids')];
          skipped.nodeNamed('If', [anyHot], [probs, ids], { then_branch: { graph: select.subgraph('select_candidates') }, else_branch: { graph: none.subgraph('no_candidates') } });
          withCandidates(skipped, { probs, ids });
        }
        const ifOutputs = [STEP_OUTPUTS.nextTokens, ...(k ? [STEP_OUTPUTS.candidateProbs, STEP_OUTPUTS.candidateIds] : [])];
        g.nodeNamed('If', [STEP_INPUTS.sampleInGraph], ifOutputs, { then_branch: { graph: drawn.subgraph('sample') }, else_branch: { graph: skipped.subgraph('no_sample') } });
        g.output(STEP_OUTPUTS.nextTokens, STEP_OUTPUTS.nextTokens, DataType.INT64, [rowsDim]);
        if (k) {
          g.output(STEP_OUTPUTS.candidateProbs, STEP_OUTPUTS.candidateProbs, DataType.FLOAT, [rowsDim, k]);
          g.output(STEP_OUTPUTS.candidateIds, STEP_OUTPUTS.candidateIds, DataType.INT64, [rowsDim, k]);
          candidates = k;
        }
      }
    }
    const presentLength = step ? 'max_length' : 'total_sequence_length';
    for (let l = first; l < end; l++) {
      g.output(this.names.presentKey(l), this.names.presentKey(l), kvType, ['batch_size', kvHeads, presentLength, headDim]);
      g.output(this.names.presentValue(l), this.names.presentValue(l), kvType, ['batch_size', kvHeads, presentLength, headDim]);
      if (join) {
        g.output(JOIN_OUTPUTS.presentKey(l), JOIN_OUTPUTS.presentKey(l), kvType, [1, kvHeads, 'join_length', headDim]);
        g.output(JOIN_OUTPUTS.presentValue(l), JOIN_OUTPUTS.presentValue(l), kvType, [1, kvHeads, 'join_length', headDim]);
      }
    }
    this.lanes = undefined;
    return { inputs: g.inputs.map((v) => v.name), outputs: g.outputs.map((v) => v.name), hiddenStateOutputs, layers: [first, end], responseSums: sums, sampling, steering: !!opts.steering, ...(candidates ? { candidates } : {}), ...(join ? { join } : {}) };
  }
}
