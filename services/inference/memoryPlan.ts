/**
 * The memory plan of the engine on one device: what the weights take, what each sequence slot
 * takes (its KV buffer rows for `slotLength` tokens, its logits and per-layer outputs), what a
 * prefill chunk works in, and so how many slots fit. `axis-model plan` prints it from a
 * config.json before anything is built; the inference service computes it at start from the
 * built weights and refuses to start when not even one slot fits.
 *
 * Units: GiB = 2^30 bytes, GB = 10^9 bytes.
 */

import type { HfConfigCore } from '../contracts/modelDirectory';

export const GiB = 2 ** 30;

/** What the CUDA context, cuBLAS/cuDNN workspaces and the allocator's slack take besides the model (a fixed reserve). */
export const RUNTIME_RESERVE_BYTES = 1 * GiB;
/** Tokens a prefill runs at once (longer prompts go in chunks of this many). */
export const PREFILL_CHUNK = 512;
/** The most slots a plan hands out, however much memory is left. */
export const MAX_SLOTS = 256;
/** Tokens a slot holds by default: the default max_context (2048) plus max_new_tokens (512). */
export const DEFAULT_SLOT_LENGTH = 2560;
/**
 * Bytes per vocabulary id of one row's draw in the step graph when it sorts the whole vocabulary
 * (services/model/sampler.ts): about what is alive at once at its peak, the float32
 * probabilities, sorted values, nucleus order and cumulative sums (4 x 4) and the int64 sorted
 * ids and their order (2 x 8).
 */
export const SAMPLER_BYTES_PER_VOCAB_ID = 32;

/** The model's dimensions the plan needs (from config.json, or axis_model.json for a built model). */
export interface PlanDims {
  numLayers: number;
  hidden: number;
  intermediate: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  vocab: number;
}

export interface PlanInput {
  dims: PlanDims;
  /** Layers on this device (a stage of a split model holds some). */
  layersHere: number;
  /** Bytes of the weights on this device. */
  weightBytes: number;
  /** Bytes per element of the arithmetic and the KV buffers: 2 (bf16, f16) or 4 (f32). */
  computeBytes: number;
  deviceMemory: number;
  slotLength: number;
  /** Whether this device computes the logits (the last stage). */
  head: boolean;
}

export interface MemoryPlan {
  deviceMemory: number;
  weightBytes: number;
  /** Keys and values of one token on this device's layers. */
  kvBytesPerToken: number;
  /**
   * One slot: its KV rows for slotLength tokens, its logits (float32), its per-layer outputs and
   * sums (float32), and its row of a decoding step's work (its token's activations, its float32
   * attention scores against a full slot, and on the head's device its draw's scratch).
   */
  bytesPerSlot: number;
  /** The runtime reserve and a prefill chunk's activations and attention scores. */
  workingBytes: number;
  slotLength: number;
  slots: number;
  fits: boolean;
}

/** The plan of one device. */
export function planDevice(input: PlanInput): MemoryPlan {
  const { dims, layersHere, computeBytes: b } = input;
  const kvBytesPerToken = 2 * layersHere * dims.kvHeads * dims.headDim * b;
  const perTokenOutputs = (input.head ? dims.vocab * 4 : 0) + 2 * layersHere * dims.hidden * 4;
  // One layer's activations of one token at a time: residual, norms, q/k/v and attention output, gate/up/down.
  const tokenActivations = (4 * dims.hidden + (dims.heads + 2 * dims.kvHeads) * dims.headDim + 3 * dims.intermediate) * b;
  // Attention scores of one token against a full slot, float32 (what onnxruntime's CPU kernel allocates; an upper bound on CUDA).
  const tokenScores = dims.heads * input.slotLength * 4;
  // A decoding step runs every busy slot's token beside a joining prompt's chunk (counted below).
  const stepRow = tokenActivations + tokenScores + (input.head ? dims.vocab * SAMPLER_BYTES_PER_VOCAB_ID : 0);
  const bytesPerSlot = input.slotLength * kvBytesPerToken + perTokenOutputs + stepRow;
  const chunk = Math.min(PREFILL_CHUNK, input.slotLength);
  const chunkActivations = chunk * tokenActivations;
  const chunkScores = chunk * tokenScores;
  const chunkLogits = input.head ? chunk * dims.vocab * 4 : 0;
  const workingBytes = RUNTIME_RESERVE_BYTES + chunkActivations + chunkScores + chunkLogits;
  const free = input.deviceMemory - input.weightBytes - workingBytes;
  const slots = Math.max(0, Math.min(MAX_SLOTS, Math.floor(free / bytesPerSlot)));
  return { deviceMemory: input.deviceMemory, weightBytes: input.weightBytes, kvBytesPerToken, bytesPerSlot, workingBytes, slotLength: input.slotLength, slots, fits: slots >= 1 };
}

/** The part of a Hugging Face config.json the plan reads. */
export type PlanConfig = HfConfigCore;

/** Norms per decoder block (Gemma 2 has four), and whether an architecture has q/k norms or q/k/v biases. */
const ARCHITECTURES: Record<string, { norms: number; qkNorm: boolean; qkvBias: boolean }> = {
  llama: { norms: 2, qkNorm: false, qkvBias: false },
  qwen2: { norms: 2, qkNorm: false, qkvBias: true },
  qwen3: { norms: 2, qkNorm: true, qkvBias: false },
  gemma2: { norms: 4, qkNorm: false, qkvBias: false },
};

export class PlanError extends Error {}

export function dimsOf(config: PlanConfig): PlanDims {
  const arch = ARCHITECTURES[config.model_type];
  if (!arch) throw new PlanError(`config.json: model_type ${JSON.stringify(config.model_type)} is not supported (supported: ${Object.keys(ARCHITECTURES).join(', ')})`);
  for (const key of ['hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'vocab_size'] as const) {
    if (!(Number.isInteger(config[key]) && config[key] > 0)) throw new PlanError(`config.json: "${key}" must be a positive integer, got ${JSON.stringify(config[key])}`);
  }
  const heads = config.num_attention_heads;
  return {
    numLayers: config.num_hidden_layers,
    hidden: config.hidden_size,
    intermediate: config.intermediate_size,
    heads,
    kvHeads: config.num_key_value_heads ?? heads,
    headDim: config.head_dim ?? config.hidden_size / heads,
    vocab: config.vocab_size,
  };
}

/**
 * Bytes of the weights of layers [first, end) as `axis-model build` stores them: matrices and
 * biases in the build's precision, norm weights in float32; the embedding table on the first
 * stage, the final norm and the head on the last (the table again when it is tied).
 */
export function weightBytes(config: PlanConfig, computeBytes: number, [first, end]: [number, number]): number {
  const d = dimsOf(config);
  const arch = ARCHITECTURES[config.model_type];
  const attention = d.hidden * (d.heads + 2 * d.kvHeads) * d.headDim + d.heads * d.headDim * d.hidden + (arch.qkvBias || config.attention_bias ? (d.heads + 2 * d.kvHeads) * d.headDim : 0);
  const mlp = 3 * d.hidden * d.intermediate;
  const norms = arch.norms * d.hidden + (arch.qkNorm ? 2 * d.headDim : 0);
  let bytes = (end - first) * ((attention + mlp) * computeBytes + norms * 4);
  const table = d.vocab * d.hidden * computeBytes;
  const tied = config.tie_word_embeddings ?? false;
  if (first === 0) bytes += table;
  if (end === d.numLayers) bytes += d.hidden * 4 + (tied && first === 0 ? 0 : table);
  return bytes;
}

/** Layers [first, end) of each of `stages` stages, as equal as can be (earlier stages take the extra layers). */
export function stageLayers(numLayers: number, stages: number): [number, number][] {
  const out: [number, number][] = [];
  let at = 0;
  for (let k = 0; k < stages; k++) {
    const n = Math.floor(numLayers / stages) + (k < numLayers % stages ? 1 : 0);
    out.push([at, at + n]);
    at += n;
  }
  return out;
}

export interface ModelPlan {
  gpus: number;
  /** One plan per device, in stage order. */
  devices: (MemoryPlan & { layers: [number, number] })[];
  /** Slots every stage can hold (a sequence occupies a slot on each stage). */
  slots: number;
  fits: boolean;
}

/** The plan of a model from its config.json over `gpus` devices of `deviceMemory` bytes each (a split into stages when more than one). */
export function planModel(config: PlanConfig, opts: { computeBytes: number; deviceMemory: number; slotLength: number; gpus: number }): ModelPlan {
  const dims = dimsOf(config);
  if (!(Number.isInteger(opts.gpus) && opts.gpus >= 1)) throw new PlanError(`--gpus must be a positive integer, got ${opts.gpus}`);
  if (opts.gpus > dims.numLayers) throw new PlanError(`--gpus ${opts.gpus}: more stages than the model's ${dims.numLayers} layers`);
  if (!(Number.isInteger(opts.slotLength) && opts.slotLength >= 1)) throw new PlanError(`--max-length must be a positive integer, got ${opts.slotLength}`);
  const devices = stageLayers(dims.numLayers, opts.gpus).map((layers) => ({
    layers,
    ...planDevice({ dims, layersHere: layers[1] - layers[0], weightBytes: weightBytes(config, opts.computeBytes, layers), computeBytes: opts.computeBytes, deviceMemory: opts.deviceMemory, slotLength: opts.slotLength, head: layers[1] === dims.numLayers }),
  }));
  const slots = Math.min(...devices.map((p) => p.slots));
  return { gpus: opts.gpus, devices, slots, fits: slots >= 1 };
}

/** The fewest devices of this size a split into stages needs, or undefined when no split up to one layer per device fits. */
export function gpusNeeded(config: PlanConfig, opts: { computeBytes: number; deviceMemory: number; slotLength: number }): number | undefined {
  const { numLayers } = dimsOf(config);
  for (let gpus = 1; gpus <= numLayers; gpus++) if (planModel(config, { ...opts, gpus }).fits) return gpus;
  return undefined;
}

/** "80GiB", "141GB", "512MiB", "1.5TiB" or a plain number of bytes; `what` names the flag in errors. */
export function parseBytes(text: string, what: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$/i.exec(text);
  if (!m) throw new PlanError(`${what}: ${JSON.stringify(text)} is not a size (e.g. 80GiB, 141GB, 512MiB, or bytes)`);
  const units: Record<string, number> = { b: 1, kb: 1e3, mb: 1e6, gb: 1e9, tb: 1e12, kib: 2 ** 10, mib: 2 ** 20, gib: 2 ** 30, tib: 2 ** 40 };
  const bytes = Math.floor(Number(m[1]) * units[(m[2] ?? 'b').toLowerCase()]);
  if (!(bytes > 0)) throw new PlanError(`${what}: must be more than 0 bytes, got ${JSON.stringify(text)}`);
  return bytes;
}

export function formatGiB(bytes: number): string {
  return `${(bytes / GiB).toFixed(2)} GiB`;
}

/** The plan as lines a person reads (axis-model plan, the service's log). */
export function describePlan(plan: ModelPlan, deviceName = 'GPU'): string[] {
  const lines: string[] = [];
  plan.devices.forEach((p, k) => {
    const where = plan.gpus > 1 ? `${deviceName} ${k} (layers ${p.layers[0]}:${p.layers[1]})` : deviceName;
    lines.push(
      `${where}: ${formatGiB(p.deviceMemory)}; weights ${formatGiB(p.weightBytes)}, working memory ${formatGiB(p.workingBytes)}, ` +
        `KV ${(p.kvBytesPerToken / 1024).toFixed(1)} KiB per token, ${formatGiB(p.bytesPerSlot)} per slot of ${p.slotLength} tokens: ${p.slots} slot${p.slots === 1 ? '' : 's'}`,
    );
  });
  lines.push(plan.fits ? `fits: ${plan.slots} sequences of up to ${plan.devices[0].slotLength} tokens at once` : 'does not fit');
  return lines;
}
