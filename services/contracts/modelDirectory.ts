import * as path from 'node:path';

/**
 * The contract between the model builder (`services/model/`, which writes a model directory)
 * and the inference service (which loads one): the directory's layout, what `axis_model.json`
 * says, and the names of the generation graph's inputs and outputs. Both import this file;
 * neither imports the other.
 */

/**
 * The keys of a Hugging Face `config.json` that both the builder and the memory plan read
 * (the builder reads more; architecture-specific keys are read where they matter).
 */
export interface HfConfigCore {
  model_type: string;
  hidden_size: number;
  intermediate_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  num_key_value_heads?: number;
  head_dim?: number;
  vocab_size: number;
  tie_word_embeddings?: boolean;
  attention_bias?: boolean;
}

/** How weights are stored in the external data file. */
export type WeightDtype = 'f32' | 'f16' | 'bf16';

/** Layout of a model directory, as transformers.js loads it. */
export const MODEL_FILES = {
  graph: path.join('onnx', 'model.onnx'),
  /** The decoder inside an ONNX Loop: a whole batch generated in one run (services/model/decodeLoop.ts). */
  decodeLoop: path.join('onnx', 'generate.onnx'),
  /** The engine's step graph: one step of prefill or decoding over fixed KV buffers, in the build's precision. */
  step: path.join('onnx', 'step.onnx'),
  weights: path.join('onnx', 'model.onnx_data'),
  metadata: 'axis_model.json',
};

/** What `axis_model.json` says of a built model; the inference service checks the graph against it. */
export interface ModelMetadata {
  format: 'assistant-axis-model/1';
  name: string;
  architecture: string;
  num_layers: number;
  hidden_size: number;
  num_attention_heads: number;
  num_key_value_heads: number;
  head_dim: number;
  vocab_size: number;
  /**
   * How weights are stored. The portable graph (`graph`) and the generation graph compute in
   * float32 whatever it is; the step graph computes in it.
   */
  dtype: WeightDtype;
  /** Layers this graph holds, [first, end): all of them unless it is one stage of a split model. */
  layers: [number, number];
  graph: string;
  weights: string;
  inputs: string[];
  outputs: string[];
  hidden_state_outputs: string[];
  /** The generation graph, over the same weights file; absent for a stage of a split model. */
  decode_loop?: { graph: string; inputs: string[]; outputs: string[]; graph_sha256: string };
  /** The engine's step graph, over the same weights file (absent in models built before it existed). */
  step?: StepGraphMetadata;
  hashes: { graph_sha256: string; weights_sha256: string; config_sha256: string };
  built_with: string;
}

/**
 * The step graph (`onnx/step.onnx`): one run is either a prefill of one sequence (batch 1,
 * any length, also in chunks) or one decoding step of every slot (length 1). Each layer's keys
 * and values live in one buffer [slots, kv_heads, max_length, head_dim] of `compute_dtype`,
 * bound as both past and present: the step's keys and values are written at each row's
 * filled length. Other inputs and outputs are int or float32.
 */
export interface StepGraphMetadata {
  graph: string;
  inputs: string[];
  outputs: string[];
  hidden_state_outputs: string[];
  /** Element type of the arithmetic and of the KV buffers. */
  compute_dtype: WeightDtype;
  graph_sha256: string;
  /**
   * The graph keeps each slot's running sums of the captured layers' hidden states (inputs
   * `response_weights`, `sums_mix`, `response_sums.{l}`; outputs `response_sums_out.{l}`), so
   * that they stay where the KV buffers are. Absent in builds before it, and without capture.
   */
  response_sums?: boolean;
  /**
   * The graph (its last stage) can sample each row's next token from its last logits position
   * (inputs `sample_in_graph`, `temperature`, `top_p`, `uniform`; output `next_tokens`), the
   * host sampler's rule.
   */
  sampling?: boolean;
  /** The graph takes interventions on its layers (STEERING_INPUTS). Absent in builds before them. */
  steering?: boolean;
  /**
   * The graph (its last stage) also gives each row's this many most probable ids and their
   * probabilities under its temperature (outputs `candidate_probs`, `candidate_ids`), so that
   * a host that samples finds the nucleus there instead of in the whole vocabulary. Absent in
   * builds before them: the host then samples from the logits alone.
   */
  candidates?: number;
  /**
   * The graph (its last stage) takes an empty `logits_positions`: a run that wants no logits
   * (an Extract, a prompt's chunk before the last) then computes none and reads none of the
   * output projection's weights. Absent in builds before it: such a run asks for its last
   * position's.
   */
  empty_logits_positions?: boolean;
  /**
   * The graph's own draw (`sample_in_graph`, a GPU's) sorts only what the step's rows need: a
   * step of greedy rows takes their argmax alone, and a nucleus that ends among the `candidates`
   * is drawn from them; only a step with a row past them (or at top_p >= 1) sorts the whole
   * vocabulary. Absent in builds before it: every drawing step sorts the whole vocabulary.
   */
  partial_sort_sampling?: boolean;
  /**
   * The graph takes a joining row beside its decoding rows (JOIN_INPUTS): an item's prompt run
   * in the same run as the other slots' decoding step, so that the weights are read once for
   * both. Absent in builds before it: every prompt is its own run.
   */
  join?: boolean;
}

export const STEP_INPUTS = {
  /** [B, S] int64 (the first stage) or `hidden_states.{first-1}` [B, S, hidden] float32 (a later one). */
  inputIds: 'input_ids',
  /** [B, S] int64: each token's position in its sequence. */
  positionIds: 'position_ids',
  /** [B] int32: each row's filled length after this step, minus one. */
  seqlensK: 'seqlens_k',
  /** int32 scalar: the largest filled length after this step. */
  totalSequenceLength: 'total_sequence_length',
  /** [K] int64: the positions of this step whose logits are wanted (the last stage only). */
  logitsPositions: 'logits_positions',
  pastKey: (l: number) => `past_key_values.${l}.key`,
  pastValue: (l: number) => `past_key_values.${l}.value`,
  /**
   * [B, 2, S] float32: per row, the weight of each position's hidden state in the running sum
   * (row 0) and in the sum of trailing whitespace that waits for content (row 1).
   */
  responseWeights: 'response_weights',
  /**
   * [B, 2, 2] float32: how a row's held sums combine before this run's are added, new =
   * mix x held + weights x hidden: identity keeps them, [[1, 1], [0, 0]] moves the waiting
   * whitespace into the sum, zeros start afresh (the held sums are then not read at all).
   */
  sumsMix: 'sums_mix',
  /** [B, 2, hidden] float32: a row's running sum and waiting sum of layer l, bound to the same buffer as `response_sums_out.{l}`. */
  responseSums: (l: number) => `response_sums.${l}`,
  /** bool scalar: sample `next_tokens` in the graph (else they are zeros and the caller samples from the logits). */
  sampleInGraph: 'sample_in_graph',
  /** [B] float32 each: a row's sampling temperature (0: greedy), top_p, and the uniform that draws its token. */
  temperature: 'temperature',
  topP: 'top_p',
  uniform: 'uniform',
} as const;

/**
 * The joining row of a step graph built with `join`: one slot's prompt tokens [1, J] run beside
 * the decoding rows [B, 1], through the same weights (the tokens of both, one after the other,
 * go through every matrix product together), each with its own attention over its own slot's
 * KV buffer. Its logits (last position) follow the decoding rows' as row B of `logits` and of
 * the sampling rows (`temperature`, `top_p`, `uniform` and the candidates then have B + 1
 * rows). J = 0: no joining row (its buffers are not read).
 */
export const JOIN_INPUTS = {
  /** [1, J] int64. */
  inputIds: 'join_input_ids',
  /** [1, J] int64. */
  positionIds: 'join_position_ids',
  /** [1] int32: the joining slot's filled length after this run, minus one. */
  seqlensK: 'join_seqlens_k',
  /** int32 scalar: the same plus one. */
  totalSequenceLength: 'join_total_sequence_length',
  /** [1, kv_heads, join_length, head_dim]: the joining slot's part of layer l's KV buffer, bound as `join_present.{l}.*` too. */
  pastKey: (l: number) => `join_past_key_values.${l}.key`,
  pastValue: (l: number) => `join_past_key_values.${l}.value`,
  /** [1, 2, J], [1, 2, 2], [1, 2, hidden] float32: the joining slot's running sums, as STEP_INPUTS' (capture builds). */
  responseWeights: 'join_response_weights',
  sumsMix: 'join_sums_mix',
  responseSums: (l: number) => `join_response_sums.${l}`,
} as const;

export const JOIN_OUTPUTS = {
  presentKey: (l: number) => `join_present.${l}.key`,
  presentValue: (l: number) => `join_present.${l}.value`,
  responseSumsOut: (l: number) => `join_response_sums_out.${l}`,
} as const;

/**
 * Interventions on the residual stream (activation capping, addition, ablation: docs/CONCEPTS.md),
 * inputs of the step graph of builds that have them (`steering: true` in its metadata; the
 * portable graph, which other tools run, has none). After decoder block
 * l, for each row b, with u = unit[l, b], a = add[l, b] and (beta, tau, gamma) = params[l, b]:
 *
 *     p = <h, u>;   h <- h - u * (beta * max(p - tau, 0) + gamma * p) + a
 *
 * so a cap is beta 1, tau the cap, gamma 0; an ablation beta 0, gamma 1; an addition puts
 * c * v in `add`. Rows of zeros change nothing, exactly; `steer` false skips it all.
 */
export const STEERING_INPUTS = {
  /** bool scalar: apply the interventions this run (else the rows' values are not read). */
  on: 'steer',
  /** [layers built, B, hidden] float32: the unit vector of each row's intervention at each layer. */
  unit: 'steer_unit',
  /** [layers built, B, hidden] float32: added after the cap or ablation. */
  add: 'steer_add',
  /** [layers built, B, 3] float32: beta, tau, gamma. */
  params: 'steer_params',
} as const;

export const STEP_OUTPUTS = {
  /** [B, K, vocab] float32. */
  logits: 'logits',
  /** [B, S, hidden] float32: the output of decoder block l. */
  hiddenState: (l: number) => `hidden_states.${l}`,
  /** Bound to the same buffer as past_key_values.{l}.key. */
  presentKey: (l: number) => `present.${l}.key`,
  presentValue: (l: number) => `present.${l}.value`,
  /** [B] int64: each row's token sampled from its last logits position. */
  nextTokens: 'next_tokens',
  /** [B, k] float32: each row's k highest probabilities under softmax(last logits / temperature), in descending order (ties by id). */
  candidateProbs: 'candidate_probs',
  /** [B, k] int64: their ids. */
  candidateIds: 'candidate_ids',
  /** [B, 2, hidden] float32: the sums after this run. */
  responseSumsOut: (l: number) => `response_sums_out.${l}`,
} as const;

/** Inputs of the generation graph (`onnx/generate.onnx`). */
export const LOOP_INPUTS = {
  inputIds: 'input_ids',
  attentionMask: 'attention_mask',
  positionIds: 'position_ids',
  /** [B, P] float: weight of each prompt position in the response mean (Extract); zeros to generate. */
  promptWeights: 'prompt_weights',
  /** Scalar int64: the most iterations to run (the prefill counts as one). */
  maxSteps: 'max_steps',
  /** [B] int64: tokens each item may sample (0 for Extract). */
  maxNewTokens: 'max_new_tokens',
  temperature: 'temperature',
  topP: 'top_p',
  /** [B, N] float in [0, 1): the item's n-th uniform decides its n-th sampled token. */
  uniforms: 'uniforms',
  stopTokenIds: 'stop_token_ids',
  /** [vocab] int64: 0 content, 1 whitespace only, 2 marker (a special token). */
  tokenKinds: 'token_kinds',
} as const;

/** Outputs of the generation graph. */
export const LOOP_OUTPUTS = {
  /** [iterations, B] int64: the token each item sampled at each iteration, -1 where it sampled none. */
  tokens: 'generated_tokens',
  /** [B, L, hidden] float: the per-layer mean over the response's counted tokens (with capture). */
  responseMean: 'response_mean',
  /** [B] int64: how many tokens the mean is over. */
  responseTokens: 'response_tokens',
} as const;

/** Values of the `token_kinds` input (docs/CONCEPTS.md, "Activation": which tokens a mean counts). */
export const TOKEN_KIND = { content: 0, whitespace: 1, marker: 2 } as const;

/** Written in `generated_tokens` where an item sampled no token at that iteration. */
export const NO_TOKEN = -1;
