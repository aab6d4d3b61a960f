import * as fs from 'node:fs';
import * as path from 'node:path';
import { decodeSafetensors } from '../../services/shared/safetensors';

/**
 * A plain float64 forward pass of a Llama checkpoint, written from Hugging Face's modeling
 * code and sharing nothing with the graph builder: the outside check of the ONNX graphs.
 * Returns every layer's output (what a forward hook on model.layers[l] sees) and the logits.
 */
export function llamaForward(checkpointDir: string, ids: number[]): { hidden: Float64Array[]; logits: Float64Array } {
  const config = JSON.parse(fs.readFileSync(path.join(checkpointDir, 'config.json'), 'utf8'));
  const weights = decodeSafetensors(fs.readFileSync(path.join(checkpointDir, 'model.safetensors'))).tensors;
  const W = (name: string) => Float64Array.from(weights[name].data);
  const D: number = config.hidden_size;
  const H: number = config.num_attention_heads;
  const KV: number = config.num_key_value_heads ?? H;
  const hd: number = config.head_dim ?? D / H;
  const I: number = config.intermediate_size;
  const V: number = config.vocab_size;
  const eps: number = config.rms_norm_eps;
  const theta: number = config.rope_theta ?? 10000;
  const S = ids.length;

  // x: [S, inF], w: [outF, inF] (torch Linear) -> [S, outF]
  const linear = (x: Float64Array, w: Float64Array, inF: number, outF: number) => {
    const y = new Float64Array(S * outF);
    for (let s = 0; s < S; s++)
      for (let o = 0; o < outF; o++) {
        let acc = 0;
        for (let i = 0; i < inF; i++) acc += x[s * inF + i] * w[o * inF + i];
        y[s * outF + o] = acc;
      }
    return y;
  };
  const rmsNorm = (x: Float64Array, w: Float64Array) => {
    const y = new Float64Array(x.length);
    for (let s = 0; s < S; s++) {
      let ms = 0;
      for (let i = 0; i < D; i++) ms += x[s * D + i] ** 2;
      const r = 1 / Math.sqrt(ms / D + eps);
      for (let i = 0; i < D; i++) y[s * D + i] = x[s * D + i] * r * w[i];
    }
    return y;
  };
  // rotary embedding on one head vector (non-interleaved halves), position p
  const rope = (v: Float64Array, off: number, p: number) => {
    const half = hd / 2;
    for (let i = 0; i < half; i++) {
      const angle = p / Math.pow(theta, (2 * i) / hd);
      const c = Math.cos(angle);
      const s = Math.sin(angle);
      const a = v[off + i];
      const b = v[off + i + half];
      v[off + i] = a * c - b * s;
      v[off + i + half] = b * c + a * s;
    }
  };

  let h = new Float64Array(S * D);
  const emb = W('model.embed_tokens.weight');
  ids.forEach((id, s) => h.set(emb.subarray(id * D, (id + 1) * D), s * D));
  const hidden: Float64Array[] = [];
  for (let l = 0; l < config.num_hidden_layers; l++) {
    const p = `model.layers.${l}`;
    const x = rmsNorm(h, W(`${p}.input_layernorm.weight`));
    const q = linear(x, W(`${p}.self_attn.q_proj.weight`), D, H * hd);
    const k = linear(x, W(`${p}.self_attn.k_proj.weight`), D, KV * hd);
    const v = linear(x, W(`${p}.self_attn.v_proj.weight`), D, KV * hd);
    for (let s = 0; s < S; s++) {
      for (let n = 0; n < H; n++) rope(q, s * H * hd + n * hd, s);
      for (let n = 0; n < KV; n++) rope(k, s * KV * hd + n * hd, s);
    }
    const ctx = new Float64Array(S * H * hd);
    for (let n = 0; n < H; n++) {
      const kvh = Math.floor(n / (H / KV));
      for (let s = 0; s < S; s++) {
        const scores = new Float64Array(s + 1);
        let max = -Infinity;
        for (let t = 0; t <= s; t++) {
          let dot = 0;
          for (let i = 0; i < hd; i++) dot += q[s * H * hd + n * hd + i] * k[t * KV * hd + kvh * hd + i];
          scores[t] = dot / Math.sqrt(hd);
          max = Math.max(max, scores[t]);
        }
        let total = 0;
        for (let t = 0; t <= s; t++) total += scores[t] = Math.exp(scores[t] - max);
        for (let t = 0; t <= s; t++)
          for (let i = 0; i < hd; i++) ctx[s * H * hd + n * hd + i] += (scores[t] / total) * v[t * KV * hd + kvh * hd + i];
      }
    }
    const attn = linear(ctx, W(`${p}.self_attn.o_proj.weight`), H * hd, D);
    const h1 = h.map((val, i) => val + attn[i]);
    const x2 = rmsNorm(h1, W(`${p}.post_attention_layernorm.weight`));
    const gate = linear(x2, W(`${p}.mlp.gate_proj.weight`), D, I);
    const up = linear(x2, W(`${p}.mlp.up_proj.weight`), D, I);
    const act = gate.map((g, i) => (g / (1 + Math.exp(-g))) * up[i]);
    const down = linear(act, W(`${p}.mlp.down_proj.weight`), I, D);
    h = h1.map((val, i) => val + down[i]);
    hidden.push(h);
  }
  const normed = rmsNorm(h, W('model.norm.weight'));
  const head = config.tie_word_embeddings ? emb : W('lm_head.weight');
  return { hidden, logits: linear(normed, head, D, V) };
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
