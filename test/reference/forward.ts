import * as fs from 'node:fs';
import * as path from 'node:path';
import { decodeSafetensors } from '../../services/shared/safetensors';

/**
 * A plain float64 forward pass of a llama, qwen2, qwen3 or gemma2 checkpoint, written from
 * Hugging Face's modeling code and sharing nothing with the graph builder: the outside check
 * of the ONNX graphs. Returns every layer's output (what a forward hook on model.layers[l]
 * sees) and the logits. `overrides` change config keys (to turn a feature off in tests);
 * `intervene` may change each block's output in place before the next block reads it.
 */
export function referenceForward(checkpointDir: string, ids: number[], overrides: Record<string, unknown> = {}, intervene?: (layer: number, h: Float64Array, positions: number, hidden: number) => void): { hidden: Float64Array[]; logits: Float64Array } {
  const config = { ...JSON.parse(fs.readFileSync(path.join(checkpointDir, 'config.json'), 'utf8')), ...overrides };
  const weights = decodeSafetensors(fs.readFileSync(path.join(checkpointDir, 'model.safetensors'))).tensors;
  const W = (name: string) => Float64Array.from(weights[name].data);
  const arch: string = config.model_type;
  const gemma = arch === 'gemma2';
  const D: number = config.hidden_size;
  const H: number = config.num_attention_heads;
  const KV: number = config.num_key_value_heads ?? H;
  const hd: number = config.head_dim ?? D / H;
  const I: number = config.intermediate_size;
  const V: number = config.vocab_size;
  const eps: number = config.rms_norm_eps;
  const S = ids.length;

  // x: [S, inF], w: [outF, inF] (torch Linear) -> [S, outF]
  const linear = (x: Float64Array, w: Float64Array, inF: number, outF: number, b?: Float64Array) => {
    const y = new Float64Array(S * outF);
    for (let s = 0; s < S; s++)
      for (let o = 0; o < outF; o++) {
        let acc = b ? b[o] : 0;
        for (let i = 0; i < inF; i++) acc += x[s * inF + i] * w[o * inF + i];
        y[s * outF + o] = acc;
      }
    return y;
  };
  // RMSNorm over consecutive groups of `size`: Llama/Qwen multiply by w, Gemma by (1 + w).
  const rmsNorm = (x: Float64Array, w: Float64Array, size = D) => {
    const y = new Float64Array(x.length);
    for (let g = 0; g < x.length / size; g++) {
      let ms = 0;
      for (let i = 0; i < size; i++) ms += x[g * size + i] ** 2;
      const r = 1 / Math.sqrt(ms / size + eps);
      for (let i = 0; i < size; i++) y[g * size + i] = x[g * size + i] * r * (gemma ? 1 + w[i] : w[i]);
    }
    return y;
  };
  const softcap = (x: number, cap: number | null | undefined) => (cap ? Math.tanh(x / cap) * cap : x);

  // Rotary frequencies, with Llama 3's scaling when configured.
  const theta: number = config.rope_theta ?? 10000;
  const invFreq = Array.from({ length: hd / 2 }, (_, i) => 1 / Math.pow(theta, (2 * i) / hd)).map((f) => {
    const sc = config.rope_scaling;
    if (arch !== 'llama' || !sc || (sc.rope_type ?? sc.type) !== 'llama3') return f;
    const wavelen = (2 * Math.PI) / f;
    const lowW = sc.original_max_position_embeddings / sc.low_freq_factor;
    const highW = sc.original_max_position_embeddings / sc.high_freq_factor;
    if (wavelen < highW) return f;
    if (wavelen > lowW) return f / sc.factor;
    const smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor);
    return (1 - smooth) * (f / sc.factor) + smooth * f;
  });
  const rope = (v: Float64Array, off: number, p: number) => {
    const half = hd / 2;
    for (let i = 0; i < half; i++) {
      const c = Math.cos(p * invFreq[i]);
      const s = Math.sin(p * invFreq[i]);
      const a = v[off + i];
      const b = v[off + i + half];
      v[off + i] = a * c - b * s;
      v[off + i + half] = b * c + a * s;
    }
  };
  const act = (x: number) => (gemma ? 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3))) : x / (1 + Math.exp(-x)));
  const scale = 1 / Math.sqrt(gemma && config.query_pre_attn_scalar ? config.query_pre_attn_scalar : hd);
  const sliding = (l: number) => gemma && config.sliding_window && (config.layer_types ? config.layer_types[l] === 'sliding_attention' : l % 2 === 0);
  const qkvBias = arch === 'qwen2' || config.attention_bias === true;

  let h = new Float64Array(S * D);
  const emb = W('model.embed_tokens.weight');
  const embScale = gemma ? Math.fround(Math.sqrt(D)) : 1;
  ids.forEach((id, s) => {
    for (let i = 0; i < D; i++) h[s * D + i] = emb[id * D + i] * embScale;
  });
  const hidden: Float64Array[] = [];
  for (let l = 0; l < config.num_hidden_layers; l++) {
    const p = `model.layers.${l}`;
    const x = rmsNorm(h, W(`${p}.input_layernorm.weight`));
    let q = linear(x, W(`${p}.self_attn.q_proj.weight`), D, H * hd, qkvBias ? W(`${p}.self_attn.q_proj.bias`) : undefined);
    let k = linear(x, W(`${p}.self_attn.k_proj.weight`), D, KV * hd, qkvBias ? W(`${p}.self_attn.k_proj.bias`) : undefined);
    const v = linear(x, W(`${p}.self_attn.v_proj.weight`), D, KV * hd, qkvBias ? W(`${p}.self_attn.v_proj.bias`) : undefined);
    if (arch === 'qwen3') {
      q = rmsNorm(q, W(`${p}.self_attn.q_norm.weight`), hd);
      k = rmsNorm(k, W(`${p}.self_attn.k_norm.weight`), hd);
    }
    for (let s = 0; s < S; s++) {
      for (let n = 0; n < H; n++) rope(q, s * H * hd + n * hd, s);
      for (let n = 0; n < KV; n++) rope(k, s * KV * hd + n * hd, s);
    }
    const ctx = new Float64Array(S * H * hd);
    for (let n = 0; n < H; n++) {
      const kvh = Math.floor(n / (H / KV));
      for (let s = 0; s < S; s++) {
        const from = sliding(l) ? Math.max(0, s - config.sliding_window + 1) : 0;
        const scores: number[] = [];
        for (let t = from; t <= s; t++) {
          let dot = 0;
          for (let i = 0; i < hd; i++) dot += q[s * H * hd + n * hd + i] * k[t * KV * hd + kvh * hd + i];
          scores.push(softcap(dot * scale, gemma ? config.attn_logit_softcapping : undefined));
        }
        const max = Math.max(...scores);
        const e = scores.map((z) => Math.exp(z - max));
        const total = e.reduce((a, b) => a + b, 0);
        for (let t = from; t <= s; t++)
          for (let i = 0; i < hd; i++) ctx[s * H * hd + n * hd + i] += (e[t - from] / total) * v[t * KV * hd + kvh * hd + i];
      }
    }
    let attn = linear(ctx, W(`${p}.self_attn.o_proj.weight`), H * hd, D);
    if (gemma) attn = rmsNorm(attn, W(`${p}.post_attention_layernorm.weight`));
    const h1 = h.map((val, i) => val + attn[i]);
    const x2 = rmsNorm(h1, W(gemma ? `${p}.pre_feedforward_layernorm.weight` : `${p}.post_attention_layernorm.weight`));
    const gate = linear(x2, W(`${p}.mlp.gate_proj.weight`), D, I);
    const up = linear(x2, W(`${p}.mlp.up_proj.weight`), D, I);
    let down = linear(gate.map((g, i) => act(g) * up[i]), W(`${p}.mlp.down_proj.weight`), I, D);
    if (gemma) down = rmsNorm(down, W(`${p}.post_feedforward_layernorm.weight`));
    h = h1.map((val, i) => val + down[i]);
    // A hook on block l's output, as the reference's steering context manager registers one.
    intervene?.(l, h, S, D);
    hidden.push(h);
  }
  const normed = rmsNorm(h, W('model.norm.weight'));
  const head = config.tie_word_embeddings ? emb : W('lm_head.weight');
  const logits = linear(normed, head, D, V).map((z) => softcap(z, gemma ? config.final_logit_softcapping : undefined));
  return { hidden, logits };
}

/** max |a - b| / max |ref| over a whole tensor. */
export function relativeError(a: ArrayLike<number>, ref: ArrayLike<number>): number {
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < ref.length; i++) {
    diff = Math.max(diff, Math.abs(a[i] - ref[i]));
    scale = Math.max(scale, Math.abs(ref[i]));
  }
  return diff / scale;
}
