import type { CheckpointReader, HfConfig } from '../checkpoint';
import { CheckpointError } from '../checkpoint';
import { DataType, GraphBuilder } from '../graph';

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
  /** Emit `hidden_states.{l}` outputs (the post-block residual stream of every layer). */
  capture: boolean;
}

/** Graph input and output names: the convention of other ONNX decoder tools, plus hidden states. */
export const NAMES = {
  inputIds: 'input_ids',
  attentionMask: 'attention_mask',
  positionIds: 'position_ids',
  pastKey: (l: number) => `past_key_values.${l}.key`,
  pastValue: (l: number) => `past_key_values.${l}.value`,
  logits: 'logits',
  presentKey: (l: number) => `present.${l}.key`,
  presentValue: (l: number) => `present.${l}.value`,
  hiddenState: (l: number) => `hidden_states.${l}`,
};

export interface GraphSignature {
  inputs: string[];
  outputs: string[];
  hiddenStateOutputs: string[];
}

/** Per-graph values every layer uses: rotary cos/sin [B, 1, S, hd] and the additive attention bias [B, 1, S, T]. */
interface Shared {
  cos: string;
  sin: string;
  bias: string;
}

/**
 * The decoder-only transformer every supported architecture shares (the Llama layout:
 * pre-norm RMSNorm, rotary attention with grouped KV heads, gated SiLU MLP). An architecture
 * is a subclass that overrides the few pieces that differ; this class is the Llama model.
 * Semantics follow Hugging Face's modeling code; weights are stored transposed ([in, out])
 * so every projection is one MatMul.
 */
export class DecoderBuilder {
  readonly dims: DecoderDims;

  constructor(protected readonly config: HfConfig, protected readonly ckpt: CheckpointReader, protected readonly g: GraphBuilder) {
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
    if (!Number.isInteger(this.dims.headDim)) throw new CheckpointError(`config.json: hidden_size ${config.hidden_size} is not a multiple of num_attention_heads ${heads}`);
    if (heads % this.dims.kvHeads !== 0) throw new CheckpointError(`config.json: num_attention_heads ${heads} is not a multiple of num_key_value_heads ${this.dims.kvHeads}`);
  }

  // ---- tensor names (Hugging Face's) ----
  protected layerPrefix(l: number): string {
    return `model.layers.${l}`;
  }

  // ---- the pieces an architecture may override ----

  /** Rotary inverse frequencies [headDim / 2], float32 as Hugging Face computes them. */
  protected inverseFrequencies(): Float32Array {
    const { headDim, ropeTheta } = this.dims;
    const out = new Float32Array(headDim / 2);
    for (let i = 0; i < out.length; i++) out[i] = 1 / Math.pow(ropeTheta, (2 * i) / headDim);
    return out;
  }

  /** Token embeddings [B, S, D]. */
  protected async embed(inputIds: string): Promise<string> {
    const table = await this.g.weight('model.embed_tokens.weight', await this.ckpt.read('model.embed_tokens.weight', [this.dims.vocab, this.dims.hidden]), [this.dims.vocab, this.dims.hidden]);
    return this.g.node('Gather', [table, inputIds], { axis: 0 });
  }

  /** RMSNorm: x / sqrt(mean(x^2) + eps) * w. */
  protected async rmsNorm(x: string, weightName: string, size = this.dims.hidden): Promise<string> {
    const g = this.g;
    const w = await g.weight(weightName, await this.ckpt.read(weightName, [size]), [size]);
    const ms = g.node('ReduceMean', [g.node('Mul', [x, x])], { axes: [-1], keepdims: 1 });
    const rms = g.node('Sqrt', [g.node('Add', [ms, g.constFloat([this.dims.eps], [])])]);
    return g.node('Mul', [g.node('Div', [x, rms]), w]);
  }

  /** x @ W^T (+ b): a Hugging Face Linear. */
  protected async linear(x: string, name: string, outFeatures: number, inFeatures: number, bias = false): Promise<string> {
    const w = await this.ckpt.read(`${name}.weight`, [outFeatures, inFeatures]);
    const wt = await this.g.weight(`${name}.weight`, transpose(w, outFeatures, inFeatures), [inFeatures, outFeatures]);
    const y = this.g.node('MatMul', [x, wt]);
    if (!bias) return y;
    const b = await this.g.weight(`${name}.bias`, await this.ckpt.read(`${name}.bias`, [outFeatures]), [outFeatures]);
    return this.g.node('Add', [y, b]);
  }

  /** Per-head transform of queries and keys before rotary (none for Llama; Qwen 3 normalises them). */
  protected async queryKeyNorm(_l: number, q: string, k: string): Promise<[string, string]> {
    return [q, k];
  }

  protected attentionScale(): number {
    return 1 / Math.sqrt(this.dims.headDim);
  }

  /** Extra terms on the attention scores before the mask (none for Llama). */
  protected scoreTransform(_l: number, scores: string): string {
    return scores;
  }

  protected hasQkvBias(): boolean {
    return false;
  }

  /** Gated MLP: down(act(gate(x)) * up(x)); act is SiLU for Llama. */
  protected async mlp(l: number, x: string): Promise<string> {
    const p = `${this.layerPrefix(l)}.mlp`;
    const { hidden, intermediate } = this.dims;
    const gate = await this.linear(x, `${p}.gate_proj`, intermediate, hidden);
    const up = await this.linear(x, `${p}.up_proj`, intermediate, hidden);
    return this.linear(this.g.node('Mul', [this.activation(gate), up]), `${p}.down_proj`, hidden, intermediate);
  }

  protected activation(x: string): string {
    return this.g.node('Mul', [x, this.g.node('Sigmoid', [x])]);
  }

  /** One decoder block: residual + attention(norm(x)), then residual + mlp(norm(x)). */
  protected async block(l: number, h: string, shared: Shared): Promise<string> {
    const p = this.layerPrefix(l);
    const attn = await this.attention(l, await this.rmsNorm(h, `${p}.input_layernorm.weight`), shared);
    const h1 = this.g.node('Add', [h, attn]);
    const mlp = await this.mlp(l, await this.rmsNorm(h1, `${p}.post_attention_layernorm.weight`));
    return this.g.node('Add', [h1, mlp]);
  }

  /** Final norm and the language-model head (tied to the embeddings when the config says so). */
  protected async head(h: string): Promise<string> {
    const normed = await this.rmsNorm(h, 'model.norm.weight');
    const tied = this.config.tie_word_embeddings === true || !this.ckpt.has('lm_head.weight');
    const name = tied ? 'model.embed_tokens' : 'lm_head';
    const { vocab, hidden } = this.dims;
    const w = await this.ckpt.read(`${name}.weight`, [vocab, hidden]);
    const wt = await this.g.weight(tied ? 'lm_head.weight(tied)' : 'lm_head.weight', transpose(w, vocab, hidden), [hidden, vocab]);
    return this.g.node('MatMul', [normed, wt]);
  }

  // ---- shared structure ----

  protected async attention(l: number, x: string, shared: Shared): Promise<string> {
    const g = this.g;
    const p = `${this.layerPrefix(l)}.self_attn`;
    const { hidden, heads, kvHeads, headDim } = this.dims;
    const bias = this.hasQkvBias();
    const toHeads = (v: string, n: number) => g.node('Transpose', [g.node('Reshape', [v, g.constInt64([0, 0, n, headDim])])], { perm: [0, 2, 1, 3] });
    let q = toHeads(await this.linear(x, `${p}.q_proj`, heads * headDim, hidden, bias), heads);
    let k = toHeads(await this.linear(x, `${p}.k_proj`, kvHeads * headDim, hidden, bias), kvHeads);
    const v = toHeads(await this.linear(x, `${p}.v_proj`, kvHeads * headDim, hidden, bias), kvHeads);
    [q, k] = await this.queryKeyNorm(l, q, k);
    q = this.rotary(q, shared);
    k = this.rotary(k, shared);
    const presentK = g.node('Concat', [NAMES.pastKey(l), k], { axis: 2 }, NAMES.presentKey(l));
    const presentV = g.node('Concat', [NAMES.pastValue(l), v], { axis: 2 }, NAMES.presentValue(l));
    const kAll = this.repeatKv(presentK);
    const vAll = this.repeatKv(presentV);
    let scores = g.node('Mul', [g.node('MatMul', [q, g.node('Transpose', [kAll], { perm: [0, 1, 3, 2] })]), g.constFloat([this.attentionScale()], [])]);
    scores = this.scoreTransform(l, scores);
    const probs = g.node('Softmax', [g.node('Add', [scores, this.maskFor(l, shared)])], { axis: -1 });
    const ctx = g.node('Transpose', [g.node('MatMul', [probs, vAll])], { perm: [0, 2, 1, 3] });
    return this.linear(g.node('Reshape', [ctx, g.constInt64([0, 0, heads * headDim])]), `${p}.o_proj`, hidden, heads * headDim);
  }

  /** The additive mask of layer l (the same causal + padding mask for every layer here). */
  protected maskFor(_l: number, shared: Shared): string {
    return shared.bias;
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
  private rotary(x: string, shared: Shared): string {
    const g = this.g;
    const half = this.dims.headDim / 2;
    const [x1, x2] = g.nodeN('Split', [x, g.constInt64([half, half])], 2, { axis: -1 });
    const rotated = g.node('Concat', [g.node('Neg', [x2]), x1], { axis: -1 });
    return g.node('Add', [g.node('Mul', [x, shared.cos]), g.node('Mul', [rotated, shared.sin])]);
  }

  /** Rotary tables from position_ids, and the attention bias from attention_mask (causal and padding). */
  protected sharedValues(): Shared {
    const g = this.g;
    const pos = g.node('Unsqueeze', [g.node('Cast', [NAMES.positionIds], { to: DataType.FLOAT }), g.constInt64([2])]);
    const freqs = g.node('Mul', [pos, g.constFloat(this.inverseFrequencies())]);
    const emb = g.node('Concat', [freqs, freqs], { axis: -1 });
    const cos = g.node('Unsqueeze', [g.node('Cos', [emb]), g.constInt64([1])]);
    const sin = g.node('Unsqueeze', [g.node('Sin', [emb]), g.constInt64([1])]);

    const scalarAt = (t: string, i: number) => g.node('Gather', [g.node('Shape', [t]), g.constInt64([i], [])], { axis: 0 });
    const S = scalarAt(NAMES.inputIds, 1);
    const T = scalarAt(NAMES.attentionMask, 1);
    const one = g.constInt64([1], []);
    const keyIdx = g.node('Range', [g.constInt64([0], []), T, one]);
    const queryIdx = g.node('Range', [g.node('Sub', [T, S]), T, one]);
    const causal = g.node('LessOrEqual', [g.node('Unsqueeze', [keyIdx, g.constInt64([0])]), g.node('Unsqueeze', [queryIdx, g.constInt64([1])])]);
    const notPadding = g.node('Unsqueeze', [g.node('Equal', [NAMES.attentionMask, g.constInt64([1], [])]), g.constInt64([1, 2])]);
    const allowed = g.node('And', [causal, notPadding]);
    // The most negative float32, as Hugging Face uses: a fully masked row (a padding query) stays finite.
    const bias = g.node('Where', [allowed, g.constFloat([0], []), g.constFloat([-3.4028234663852886e38], [])]);
    return { cos, sin, bias };
  }

  /** Declares the inputs, builds every block and the head, declares the outputs. */
  async build(opts: BuildOptions): Promise<GraphSignature> {
    const g = this.g;
    const { numLayers, kvHeads, headDim, hidden, vocab } = this.dims;
    g.input(NAMES.inputIds, DataType.INT64, ['batch_size', 'sequence_length']);
    g.input(NAMES.attentionMask, DataType.INT64, ['batch_size', 'total_sequence_length']);
    g.input(NAMES.positionIds, DataType.INT64, ['batch_size', 'sequence_length']);
    for (let l = 0; l < numLayers; l++) {
      g.input(NAMES.pastKey(l), DataType.FLOAT, ['batch_size', kvHeads, 'past_sequence_length', headDim]);
      g.input(NAMES.pastValue(l), DataType.FLOAT, ['batch_size', kvHeads, 'past_sequence_length', headDim]);
    }
    const shared = this.sharedValues();
    let h = await this.embed(NAMES.inputIds);
    const hiddenStateOutputs: string[] = [];
    for (let l = 0; l < numLayers; l++) {
      h = await this.block(l, h, shared);
      if (opts.capture) {
        g.output(h, NAMES.hiddenState(l), DataType.FLOAT, ['batch_size', 'sequence_length', hidden]);
        hiddenStateOutputs.push(NAMES.hiddenState(l));
      }
    }
    g.output(await this.head(h), NAMES.logits, DataType.FLOAT, ['batch_size', 'sequence_length', vocab]);
    for (let l = 0; l < numLayers; l++) {
      g.output(NAMES.presentKey(l), NAMES.presentKey(l), DataType.FLOAT, ['batch_size', kvHeads, 'total_sequence_length', headDim]);
      g.output(NAMES.presentValue(l), NAMES.presentValue(l), DataType.FLOAT, ['batch_size', kvHeads, 'total_sequence_length', headDim]);
    }
    return {
      inputs: g.inputs.map((v) => v.name),
      outputs: g.outputs.map((v) => v.name),
      hiddenStateOutputs,
    };
  }
}

/** [rows, cols] -> [cols, rows]. */
export function transpose(w: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(w.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = w[r * cols + c];
  return out;
}
