import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { digest, Rng } from '../shared/random';
import { encodeSafetensors } from '../shared/safetensors';
import type { FloatTensor } from '../shared/tensor';
import { byteLevelBpe } from './tokenizer';

export const TINY_ARCHITECTURES = ['llama', 'qwen2', 'qwen3', 'gemma2'] as const;
export type TinyArch = (typeof TINY_ARCHITECTURES)[number];

export interface TinyOptions {
  arch: string;
  out: string;
  seed: number;
  /** GPT-2 merges kept in the tokenizer (a smaller vocabulary keeps the tiny model fast). */
  merges: number;
  /** Another size than the tiny default (benchmarks): weights are then scaled by 1/sqrt(hidden). */
  shape?: Partial<typeof SHAPE>;
}

const CHATML =
  "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}";

/** Chat templates of each family's shape (short versions of the real ones). */
export const CHAT_TEMPLATES: Record<TinyArch, string> = {
  // Llama 3: header / eot markers; renders a system message.
  llama:
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}{%- endfor %}" +
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
  // Qwen 2: ChatML with a default system message when none is given.
  qwen2:
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}" +
    CHATML +
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
  // Qwen 3: ChatML; with thinking off, the generation prompt holds an empty think block.
  qwen3:
    CHATML +
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}",
  // Gemma 2: no system role (raises, as the real template does); the assistant is "model".
  gemma2:
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}" +
    "{%- for message in messages %}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}" +
    "{%- if message['role'] == 'assistant' %}{%- set role = 'model' %}{%- else %}{%- set role = message['role'] %}{%- endif %}" +
    "{{ '<start_of_turn>' + role + '\\n' + (message['content'] | trim) + '<end_of_turn>\\n' }}{%- endfor %}" +
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}",
};

interface Family {
  specials: string[];
  bos?: string;
  eos: string;
  stops: string[];
  config: (vocab: number, ids: Record<string, number>) => Record<string, unknown>;
}

const SHAPE = { hidden_size: 64, intermediate_size: 128, num_hidden_layers: 4, num_attention_heads: 4, num_key_value_heads: 2 };

/**
 * Each family's config, chosen so that every feature acts on a short input: llama3 rope scaling
 * whose bands (kept, blended, slowed) all hold some frequencies; Gemma 2's 4-token sliding window
 * and soft caps low enough that scores and logits reach them; Qwen 3's head_dim unlike hidden/heads.
 */
const FAMILIES: Record<TinyArch, Family> = {
  llama: {
    specials: ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>'],
    bos: '<|begin_of_text|>',
    eos: '<|eot_id|>',
    stops: ['<|eot_id|>', '<|end_of_text|>'],
    config: () => ({
      architectures: ['LlamaForCausalLM'],
      model_type: 'llama',
      ...SHAPE,
      head_dim: 16,
      rms_norm_eps: 1e-5,
      rope_theta: 10000,
      rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 256 },
      tie_word_embeddings: false,
      attention_bias: false,
      mlp_bias: false,
      hidden_act: 'silu',
    }),
  },
  qwen2: {
    specials: ['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
    eos: '<|im_end|>',
    stops: ['<|im_end|>', '<|endoftext|>'],
    config: () => ({
      architectures: ['Qwen2ForCausalLM'],
      model_type: 'qwen2',
      ...SHAPE,
      rms_norm_eps: 1e-6,
      rope_theta: 1000000,
      tie_word_embeddings: true,
      hidden_act: 'silu',
      use_sliding_window: false,
    }),
  },
  qwen3: {
    specials: ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<think>', '</think>'],
    eos: '<|im_end|>',
    stops: ['<|im_end|>', '<|endoftext|>'],
    config: () => ({
      architectures: ['Qwen3ForCausalLM'],
      model_type: 'qwen3',
      ...SHAPE,
      head_dim: 32,
      rms_norm_eps: 1e-6,
      rope_theta: 1000000,
      tie_word_embeddings: true,
      attention_bias: false,
      hidden_act: 'silu',
      use_sliding_window: false,
    }),
  },
  gemma2: {
    specials: ['<pad>', '<eos>', '<bos>', '<start_of_turn>', '<end_of_turn>'],
    bos: '<bos>',
    eos: '<eos>',
    stops: ['<eos>', '<end_of_turn>'],
    config: () => ({
      architectures: ['Gemma2ForCausalLM'],
      model_type: 'gemma2',
      ...SHAPE,
      head_dim: 16,
      rms_norm_eps: 1e-6,
      rope_theta: 10000,
      query_pre_attn_scalar: 24,
      attn_logit_softcapping: 2.5,
      final_logit_softcapping: 3.5,
      sliding_window: 4,
      hidden_activation: 'gelu_pytorch_tanh',
      hidden_act: 'gelu_pytorch_tanh',
      tie_word_embeddings: true,
    }),
  },
};

/**
 * Writes a small random-weight Hugging Face checkpoint of an architecture: config.json,
 * model.safetensors with the standard tensor names, a real byte-level BPE tokenizer with the
 * family's special tokens and chat template, and generation_config.json. Same seed, same weights.
 */
export async function writeTinyCheckpoint(opts: TinyOptions): Promise<void> {
  if (!(TINY_ARCHITECTURES as readonly string[]).includes(opts.arch)) throw new Error(`--arch: ${JSON.stringify(opts.arch)} is not supported (supported: ${TINY_ARCHITECTURES.join(', ')})`);
  const arch = opts.arch as TinyArch;
  const family = FAMILIES[arch];
  const { tokenizer, vocabSize, specialIds } = byteLevelBpe(opts.merges, family.specials);
  const config: Record<string, any> = {
    _name_or_path: opts.shape ? `random-${arch}` : `tiny-${arch}`,
    ...family.config(vocabSize, specialIds),
    ...(opts.shape ?? {}),
    vocab_size: vocabSize,
    max_position_embeddings: 32768,
    bos_token_id: family.bos ? specialIds[family.bos] : null,
    eos_token_id: family.stops.map((t) => specialIds[t]),
    torch_dtype: 'float32',
  };
  const rng = new Rng(digest({ tiny: arch, seed: opts.seed }));
  const normal = (n: number, std: number, mean: number) => {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = mean + std * Math.sqrt(-2 * Math.log(1 - rng.next())) * Math.cos(2 * Math.PI * rng.next());
    return out;
  };
  const tensors: Record<string, FloatTensor> = {};
  const D = config.hidden_size as number;
  // The tiny default keeps its weights (and the golden files made from them); larger shapes keep activations in range.
  const scale = opts.shape ? Math.sqrt(SHAPE.hidden_size / D) : 1;
  const t = (name: string, shape: number[], std: number, mean = 0) => {
    tensors[name] = { shape, data: normal(shape.reduce((a, b) => a * b, 1), shape.length > 1 ? std * scale : std, mean) };
  };
  const I = config.intermediate_size as number;
  const H = config.num_attention_heads as number;
  const KV = config.num_key_value_heads as number;
  const hd = (config.head_dim as number | undefined) ?? D / H;
  // Gemma's norms multiply by (1 + w): their weights sit around 0, the others' around 1.
  const normMean = arch === 'gemma2' ? 0 : 1;
  t('model.embed_tokens.weight', [vocabSize, D], arch === 'gemma2' ? 0.15 : 1);
  for (let l = 0; l < config.num_hidden_layers; l++) {
    const p = `model.layers.${l}`;
    t(`${p}.input_layernorm.weight`, [D], 0.1, normMean);
    t(`${p}.post_attention_layernorm.weight`, [D], 0.1, normMean);
    if (arch === 'gemma2') {
      t(`${p}.pre_feedforward_layernorm.weight`, [D], 0.1, normMean);
      t(`${p}.post_feedforward_layernorm.weight`, [D], 0.1, normMean);
    }
    t(`${p}.self_attn.q_proj.weight`, [H * hd, D], 0.15);
    t(`${p}.self_attn.k_proj.weight`, [KV * hd, D], 0.15);
    t(`${p}.self_attn.v_proj.weight`, [KV * hd, D], 0.15);
    t(`${p}.self_attn.o_proj.weight`, [D, H * hd], 0.15);
    if (arch === 'qwen2') {
      t(`${p}.self_attn.q_proj.bias`, [H * hd], 0.5);
      t(`${p}.self_attn.k_proj.bias`, [KV * hd], 0.5);
      t(`${p}.self_attn.v_proj.bias`, [KV * hd], 0.5);
    }
    if (arch === 'qwen3') {
      t(`${p}.self_attn.q_norm.weight`, [hd], 0.3, 1);
      t(`${p}.self_attn.k_norm.weight`, [hd], 0.3, 1);
    }
    t(`${p}.mlp.gate_proj.weight`, [I, D], 0.15);
    t(`${p}.mlp.up_proj.weight`, [I, D], 0.15);
    t(`${p}.mlp.down_proj.weight`, [D, I], 0.1);
  }
  t('model.norm.weight', [D], 0.1, normMean);
  if (!config.tie_word_embeddings) t('lm_head.weight', [vocabSize, D], 0.3);

  await fs.mkdir(opts.out, { recursive: true });
  const write = (name: string, value: unknown) => fs.writeFile(path.join(opts.out, name), JSON.stringify(value, null, 2) + '\n');
  await write('config.json', config);
  await fs.writeFile(path.join(opts.out, 'model.safetensors'), encodeSafetensors(tensors, { format: 'pt' }));
  await write('tokenizer.json', tokenizer);
  await write('tokenizer_config.json', {
    bos_token: family.bos ?? null,
    eos_token: family.eos,
    chat_template: CHAT_TEMPLATES[arch],
    model_max_length: 2048,
    clean_up_tokenization_spaces: false,
    tokenizer_class: 'PreTrainedTokenizerFast',
  });
  await write('generation_config.json', { bos_token_id: config.bos_token_id, eos_token_id: config.eos_token_id, do_sample: true, temperature: 0.7, top_p: 0.9 });
}
