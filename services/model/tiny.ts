import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { digest, Rng } from '../shared/random';
import { encodeSafetensors } from '../shared/safetensors';
import type { FloatTensor } from '../shared/tensor';
import { byteLevelBpe } from './tokenizer';

export interface TinyOptions {
  arch: string;
  out: string;
  seed: number;
  /** GPT-2 merges kept in the tokenizer (a smaller vocabulary keeps the tiny model fast). */
  merges: number;
}

/** Chat templates of the families' shape, for the tiny checkpoints. */
export const CHAT_TEMPLATES = {
  /** Llama 3's header/eot layout; renders a system message. */
  llama:
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}{%- endfor %}" +
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
};

const LLAMA_SPECIALS = ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>'];

/**
 * Writes a small random-weight Hugging Face checkpoint: config.json, model.safetensors with
 * the standard tensor names, a real byte-level BPE tokenizer with a chat template, and
 * generation_config.json. The same seed writes the same weights.
 */
export async function writeTinyCheckpoint(opts: TinyOptions): Promise<void> {
  if (opts.arch !== 'llama') throw new Error(`--arch: ${JSON.stringify(opts.arch)} is not supported yet (supported: llama)`);
  const { tokenizer, vocabSize, specialIds } = byteLevelBpe(opts.merges, LLAMA_SPECIALS);
  const config = {
    _name_or_path: 'tiny-llama',
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    hidden_size: 64,
    intermediate_size: 128,
    num_hidden_layers: 4,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    head_dim: 16,
    vocab_size: vocabSize,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    max_position_embeddings: 2048,
    tie_word_embeddings: false,
    attention_bias: false,
    mlp_bias: false,
    hidden_act: 'silu',
    bos_token_id: specialIds['<|begin_of_text|>'],
    eos_token_id: [specialIds['<|eot_id|>'], specialIds['<|end_of_text|>']],
    torch_dtype: 'float32',
  };
  const rng = new Rng(digest({ tiny: opts.arch, seed: opts.seed }));
  const normal = (n: number, std: number, mean = 0) => {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = mean + std * Math.sqrt(-2 * Math.log(1 - rng.next())) * Math.cos(2 * Math.PI * rng.next());
    return out;
  };
  const t = (shape: number[], std: number, mean = 0): FloatTensor => ({ shape, data: normal(shape.reduce((a, b) => a * b, 1), std, mean) });
  const { hidden_size: D, intermediate_size: I, num_attention_heads: H, num_key_value_heads: KV, head_dim: hd, num_hidden_layers: L } = config;
  const tensors: Record<string, FloatTensor> = { 'model.embed_tokens.weight': t([vocabSize, D], 1) };
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}`;
    tensors[`${p}.input_layernorm.weight`] = t([D], 0.1, 1);
    tensors[`${p}.self_attn.q_proj.weight`] = t([H * hd, D], 0.15);
    tensors[`${p}.self_attn.k_proj.weight`] = t([KV * hd, D], 0.15);
    tensors[`${p}.self_attn.v_proj.weight`] = t([KV * hd, D], 0.15);
    tensors[`${p}.self_attn.o_proj.weight`] = t([D, H * hd], 0.15);
    tensors[`${p}.post_attention_layernorm.weight`] = t([D], 0.1, 1);
    tensors[`${p}.mlp.gate_proj.weight`] = t([I, D], 0.15);
    tensors[`${p}.mlp.up_proj.weight`] = t([I, D], 0.15);
    tensors[`${p}.mlp.down_proj.weight`] = t([D, I], 0.1);
  }
  tensors['model.norm.weight'] = t([D], 0.1, 1);
  tensors['lm_head.weight'] = t([vocabSize, D], 0.3);

  await fs.mkdir(opts.out, { recursive: true });
  const write = (name: string, value: unknown) => fs.writeFile(path.join(opts.out, name), JSON.stringify(value, null, 2) + '\n');
  await write('config.json', config);
  await fs.writeFile(path.join(opts.out, 'model.safetensors'), encodeSafetensors(tensors, { format: 'pt' }));
  await write('tokenizer.json', tokenizer);
  await write('tokenizer_config.json', {
    bos_token: '<|begin_of_text|>',
    eos_token: '<|eot_id|>',
    chat_template: CHAT_TEMPLATES.llama,
    model_max_length: 2048,
    clean_up_tokenization_spaces: false,
    tokenizer_class: 'PreTrainedTokenizerFast',
  });
  await write('generation_config.json', { bos_token_id: config.bos_token_id, eos_token_id: config.eos_token_id, do_sample: true, temperature: 0.7, top_p: 0.9 });
}
