import type { ChatMessage, SamplingParams } from '../../gen/assistant_axis/v1/common';
import type { GetModelInfoResponse } from '../../gen/assistant_axis/v1/inference';
import type { FloatTensor } from '../shared/tensor';

/** What a model backend (`onnx`: a built model on onnxruntime; `synthetic`: no model) offers the inference service's adapter. */
export interface InferenceBackend {
  /** Everything the service reports about its model; `capacity` is items it can usefully hold in flight. */
  readonly info: GetModelInfoResponse;
  /** How it decodes, for the model_info metric and the logs: the ONNX runner (loop, host), or synthetic. */
  readonly decodeKind: string;
  /** Sequences in the batch running now (0 when idle), or undefined for a backend that runs each item alone. */
  currentBatchSize(): number | undefined;
  load(): Promise<void>;
  /** Generates an answer to `messages` and, in the same pass, the per-layer mean over its content tokens. */
  generate(input: GenerateInput): Promise<GenerateOutput>;
  /** Prefill of a conversation that ends with the assistant's answer: the same per-layer mean. */
  extract(messages: ChatMessage[], layers: number[], opts?: ExtractOptions): Promise<ExtractOutput>;
  /** Each assistant turn of a conversation projected on an axis, in one pass over the whole conversation. */
  project(input: ProjectInput): Promise<ProjectOutput>;
  close(): Promise<void>;
}

export interface GenerateInput {
  messages: ChatMessage[];
  sampling: SamplingParams;
  seed: number;
  /** Zero-indexed layers to return, validated by the adapter; empty = all. */
  layers: number[];
  /** Aborted when nobody waits for the answer any more (its stream was cancelled): the backend may stop early. */
  signal?: AbortSignal;
  /** The text and token ids only: no activation (the caller measures the saved answer with Extract). */
  textOnly?: boolean;
  /** An experiment of the replica's capping config (empty or "none": none). */
  cappingExperiment?: string;
  /**
   * The answer's text as it grows, in pieces whose concatenation is the final text (streaming);
   * a backend without tokens gives it in one piece at the end. Returning true ends the answer
   * there (a stop string: the slots engine stops the item, the others let it run on).
   */
  onText?: (delta: string) => boolean | void;
  /** Who asked: a run's item or a chat request (the slots policy may favour one; default run). */
  lane?: 'run' | 'chat';
}

export interface GenerateOutput {
  text: string;
  promptTokens: number;
  completionTokens: number;
  finishReason: 'stop' | 'length';
  /** [layers.length || num_layers, hidden]; [0, hidden] when the input asked for the text only. */
  activation: FloatTensor;
  /** From the start of generation to the first token sampled (the prefill). */
  timeToFirstTokenSeconds?: number;
  /** After the first token, the mean time of each further one (the decoding steps). */
  timePerOutputTokenSeconds?: number;
  /** The answer's token ids as sampled, where the backend has tokens. */
  responseIds?: number[];
}

export interface ExtractOptions {
  /** The answer's sampled token ids, when the caller kept them (else its text is tokenized). */
  answerIds?: number[];
  /** Render the prompt with the thinking switch on, as the answer was generated. */
  enableThinking?: boolean;
  /** As GenerateInput's. */
  signal?: AbortSignal;
  /** As GenerateInput's: measured with the interventions the answer was generated with. */
  cappingExperiment?: string;
}

export interface ExtractOutput {
  responseTokens: number;
  activation: FloatTensor;
}

export interface ProjectInput {
  messages: ChatMessage[];
  /** The axis [rows, hidden], one row per layer of `axisLayers` (validated by the adapter). */
  axis: FloatTensor;
  axisLayers: number[];
  /** The model layer whose row token projections are read at. */
  targetLayer: number;
  tokenProjections: boolean;
  enableThinking: boolean;
  /** Tokens per prefill run (0: the backend's default). */
  chunk: number;
  signal?: AbortSignal;
}

export interface ProjectOutput {
  turns: { messageIndex: number; turn: number; tokens: number; projections: number[]; tokenProjections?: number[]; counted?: boolean[] }[];
  totalTokens: number;
}

/** Keeps only the chosen rows (layers) of an [L, d] tensor. */
export function selectLayers(full: FloatTensor, layers: number[]): FloatTensor {
  if (layers.length === 0) return full;
  const d = full.shape[1];
  const out = new Float32Array(layers.length * d);
  layers.forEach((l, i) => out.set(full.data.subarray(l * d, (l + 1) * d), i * d));
  return { shape: [layers.length, d], data: out };
}
