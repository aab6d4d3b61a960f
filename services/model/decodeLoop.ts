import { LOOP_INPUTS, LOOP_OUTPUTS, NO_TOKEN, TOKEN_KIND } from '../contracts/modelDirectory';
import type { CheckpointReader, HfConfig } from './checkpoint';
import { builderFor } from './builders';
import { prefixedNames } from './builders/decoder';
import { DataType, GraphBuilder } from './graph';
import { sampleTokens } from './sampler';

/**
 * The generation graph: the decoder inside an ONNX `Loop`, so that one `run()` generates a whole
 * batch and the KV cache stays wherever the execution provider keeps it (on the GPU under CUDA)
 * as loop-carried state. onnxruntime-node returns every output in host memory, and its only
 * device-resident outputs are WebGPU buffers, so a loop driven from JavaScript would copy the
 * whole cache to the host and back at every token.
 *
 * Iteration 0 is the prefill of the left-padded prompts; each later iteration feeds the tokens
 * sampled by the one before. Sampling (greedy at temperature 0, else temperature and nucleus
 * with one uniform per token from the caller) and the per-layer response sums (docs/CONCEPTS.md,
 * "Activation": content tokens, markers never, whitespace only between content tokens) happen in
 * the graph. Extract is the same graph with no token to sample and `prompt_weights` marking
 * the response positions of the prefill.
 */
const BODY = 'loop.';

export interface DecodeLoopSignature {
  inputs: string[];
  outputs: string[];
}

/** Builds the generation graph into `g` (a root builder whose weights point at the decoder graph's). */
export async function buildDecodeLoop(config: HfConfig, ckpt: CheckpointReader, g: GraphBuilder, capture: boolean): Promise<DecodeLoopSignature> {
  const outer = builderFor(config, ckpt, g); // only for its dimensions
  const { numLayers: L, hidden: d, kvHeads, headDim } = outer.dims;
  const I = LOOP_INPUTS;
  g.input(I.inputIds, DataType.INT64, ['batch_size', 'prompt_length']);
  g.input(I.attentionMask, DataType.INT64, ['batch_size', 'prompt_length']);
  g.input(I.positionIds, DataType.INT64, ['batch_size', 'prompt_length']);
  if (capture) g.input(I.promptWeights, DataType.FLOAT, ['batch_size', 'prompt_length']);
  g.input(I.maxSteps, DataType.INT64, []);
  g.input(I.maxNewTokens, DataType.INT64, ['batch_size']);
  g.input(I.temperature, DataType.FLOAT, ['batch_size']);
  g.input(I.topP, DataType.FLOAT, ['batch_size']);
  g.input(I.uniforms, DataType.FLOAT, ['batch_size', 'uniform_count']);
  g.input(I.stopTokenIds, DataType.INT64, ['stop_count']);
  if (capture) g.input(I.tokenKinds, DataType.INT64, [outer.dims.vocab]);

  // ---- initial loop state, in the outer graph ----
  const B = g.node('Slice', [g.node('Shape', [I.inputIds]), g.constInt64([0]), g.constInt64([1])]);
  const filled = (dims: string[], value: number, type: number) =>
    g.node('ConstantOfShape', [g.node('Concat', dims, { axis: 0 })], { value: scalarTensor(value, type) });
  const emptyCache = filled([B, g.constInt64([kvHeads, 0, headDim])], 0, DataType.FLOAT);
  const falses = g.node('Cast', [filled([B], 0, DataType.INT64)], { to: DataType.BOOL });
  const zerosI64 = filled([B], 0, DataType.INT64);
  const zerosF64 = filled([B], 0, DataType.DOUBLE);
  const sumsZero = filled([B, g.constInt64([L, d])], 0, DataType.DOUBLE);
  const active = g.node('Greater', [I.maxNewTokens, g.constInt64([0], [])]);

  // State carried from one iteration to the next, in order: [name in the body, initial value, type, dims].
  const carried: [string, string, number, (number | string)[]][] = [
    ['input_ids', I.inputIds, DataType.INT64, ['batch_size', 'sequence_length']],
    ['attention_mask', I.attentionMask, DataType.INT64, ['batch_size', 'total_sequence_length']],
    ['position_ids', I.positionIds, DataType.INT64, ['batch_size', 'sequence_length']],
  ];
  for (let l = 0; l < L; l++) {
    carried.push([`past_key_values.${l}.key`, emptyCache, DataType.FLOAT, ['batch_size', kvHeads, 'past_sequence_length', headDim]]);
    carried.push([`past_key_values.${l}.value`, emptyCache, DataType.FLOAT, ['batch_size', kvHeads, 'past_sequence_length', headDim]]);
  }
  carried.push(['feeding', falses, DataType.BOOL, ['batch_size']]);
  carried.push(['sampled', zerosI64, DataType.INT64, ['batch_size']]);
  carried.push(['active', active, DataType.BOOL, ['batch_size']]);
  if (capture) {
    carried.push(['weights', I.promptWeights, DataType.FLOAT, ['batch_size', 'sequence_length']]);
    carried.push(['sum', sumsZero, DataType.DOUBLE, ['batch_size', L, d]]);
    carried.push(['pending', sumsZero, DataType.DOUBLE, ['batch_size', L, d]]);
    carried.push(['count', zerosF64, DataType.DOUBLE, ['batch_size']]);
    carried.push(['pending_count', zerosF64, DataType.DOUBLE, ['batch_size']]);
    carried.push(['started', falses, DataType.BOOL, ['batch_size']]);
  }

  // ---- the body ----
  const b = g.child();
  const v = (name: string) => BODY + name;
  b.input(v('iteration'), DataType.INT64, []);
  b.input(v('condition'), DataType.BOOL, []);
  for (const [name, , type, dims] of carried) b.input(v(name), type, dims);
  const decoder = builderFor(config, ckpt, b, { names: prefixedNames(BODY) });
  const values = await decoder.forward(v('input_ids'), undefined, [0, L]);

  const last = (x: string) => b.node('Gather', [x, b.constInt64([-1], [])], { axis: 1 });
  const lastLogits = last(values.logits!); // [B, V]
  const sampledBefore = v('sampled');
  const wantSample = v('active');

  // Sampling (sampler.ts), with each item's uniform for its n-th token.
  const uniformCount = b.node('Slice', [b.node('Shape', [I.uniforms]), b.constInt64([1]), b.constInt64([2])]);
  const uniformIndex = b.node('Unsqueeze', [b.node('Min', [sampledBefore, b.node('Sub', [b.node('Squeeze', [uniformCount, b.constInt64([0])]), b.constInt64([1], [])])]), b.constInt64([1])]);
  const uniform = b.node('Squeeze', [b.node('GatherElements', [I.uniforms, uniformIndex], { axis: 1 }), b.constInt64([1])]);
  const token = sampleTokens(b, lastLogits, I.temperature, I.topP, uniform);

  const isStop = b.node('Cast', [b.node('ReduceMax', [b.node('Cast', [b.node('Equal', [b.node('Unsqueeze', [token, b.constInt64([1])]), I.stopTokenIds])], { to: DataType.INT32 })], { axes: [1], keepdims: 0 })], { to: DataType.BOOL });
  const feedNext = b.node('And', [wantSample, b.node('Not', [isStop])]);
  const sampledNow = b.node('Add', [sampledBefore, b.node('Cast', [feedNext], { to: DataType.INT64 })]);
  const activeNext = b.node('And', [feedNext, b.node('Less', [sampledNow, I.maxNewTokens])]);
  const tokenOut = b.node('Where', [wantSample, token, b.constInt64([NO_TOKEN], [])]);
  const nextIds = b.node('Unsqueeze', [b.node('Where', [feedNext, token, b.constInt64([0], [])]), b.constInt64([1])]);
  const nextMask = b.node('Concat', [v('attention_mask'), b.node('Unsqueeze', [b.node('Cast', [feedNext], { to: DataType.INT64 }), b.constInt64([1])])], { axis: 1 });
  const nextPositions = b.node('Add', [b.node('Slice', [v('position_ids'), b.constInt64([-1]), b.constInt64([Number.MAX_SAFE_INTEGER]), b.constInt64([1])]), b.constInt64([1], [])]);
  const condition = b.node('Cast', [b.node('ReduceMax', [b.node('Cast', [feedNext], { to: DataType.INT32 })], { keepdims: 0 })], { to: DataType.BOOL });

  const next: Record<string, string> = { input_ids: nextIds, attention_mask: nextMask, position_ids: nextPositions, feeding: feedNext, sampled: sampledNow, active: activeNext };
  for (let l = 0; l < L; l++) {
    next[`past_key_values.${l}.key`] = BODY + `present.${l}.key`;
    next[`past_key_values.${l}.value`] = BODY + `present.${l}.value`;
  }

  if (capture) {
    // Only [B, d] rows per layer become float64: the fed token's row, and the prefill's weighted
    // sum over its positions (Extract: sum_p w[p] h[p], a float32 MatMul over at most the
    // conversation's positions), so capture adds little to a step.
    const w = b.node('Unsqueeze', [v('weights'), b.constInt64([1])]); // [B, 1, S]
    const toDouble = (x: string) => b.node('Cast', [x], { to: DataType.DOUBLE });
    const weighted = toDouble(b.node('Concat', values.hidden.map((h) => b.node('MatMul', [w, h])), { axis: 1 })); // [B, L, d]
    const weightTotal = toDouble(b.node('ReduceSum', [v('weights'), b.constInt64([-1])], { keepdims: 0 }));
    const fedRow = toDouble(b.node('Concat', values.hidden.map((h) => b.node('Unsqueeze', [last(h), b.constInt64([1])])), { axis: 1 })); // [B, L, d]
    const kind = b.node('Gather', [I.tokenKinds, last(v('input_ids'))], { axis: 0 });
    const isContent = b.node('And', [v('feeding'), b.node('Equal', [kind, b.constInt64([TOKEN_KIND.content], [])])]);
    const isSpace = b.node('And', [b.node('And', [v('feeding'), v('started')]), b.node('Equal', [kind, b.constInt64([TOKEN_KIND.whitespace], [])])]);
    const asRows = (x: string) => b.node('Unsqueeze', [x, b.constInt64([1, 2])]);
    const zero = b.node('Cast', [b.constFloat([0], [])], { to: DataType.DOUBLE });
    const one = b.node('Cast', [b.constFloat([1], [])], { to: DataType.DOUBLE });
    const sum = b.node('Add', [b.node('Where', [asRows(isContent), b.node('Add', [b.node('Add', [v('sum'), v('pending')]), fedRow]), v('sum')]), weighted]);
    const pending = b.node('Where', [asRows(isContent), zero, b.node('Where', [asRows(isSpace), b.node('Add', [v('pending'), fedRow]), v('pending')])]);
    const count = b.node('Add', [b.node('Where', [isContent, b.node('Add', [b.node('Add', [v('count'), v('pending_count')]), one]), v('count')]), weightTotal]);
    const pendingCount = b.node('Where', [isContent, zero, b.node('Where', [isSpace, b.node('Add', [v('pending_count'), one]), v('pending_count')])]);
    Object.assign(next, {
      weights: b.node('Cast', [b.node('Unsqueeze', [zerosLike(b, feedNext), b.constInt64([1])])], { to: DataType.FLOAT }),
      sum,
      pending,
      count,
      pending_count: pendingCount,
      started: b.node('Or', [v('started'), isContent]),
    });
  }

  b.output(condition, v('condition_out'), DataType.BOOL, []);
  for (const [name, , type, dims] of carried) b.output(next[name], v(`${name}_out`), type, dims);
  b.output(tokenOut, v('token_out'), DataType.INT64, ['batch_size']);

  const finals = carried.map(([name]) => g.fresh(`final.${name}`));
  const trueCondition = g.node('Cast', [g.constInt64([1], [])], { to: DataType.BOOL });
  // Loop: trip count, condition, initial state; outputs the final state, then the scan of tokens.
  g.nodeNamed('Loop', [I.maxSteps, trueCondition, ...carried.map(([, init]) => init)], [...finals, LOOP_OUTPUTS.tokens], { body: { graph: b.subgraph('decode_step') } });
  g.output(LOOP_OUTPUTS.tokens, LOOP_OUTPUTS.tokens, DataType.INT64, ['iterations', 'batch_size']);
  if (capture) {
    const final = (name: string) => finals[carried.findIndex(([n]) => n === name)];
    const countFinal = final('count');
    const divisor = g.node('Unsqueeze', [g.node('Max', [countFinal, g.node('Cast', [g.constFloat([1], [])], { to: DataType.DOUBLE })]), g.constInt64([1, 2])]);
    g.output(g.node('Cast', [g.node('Div', [final('sum'), divisor])], { to: DataType.FLOAT }), LOOP_OUTPUTS.responseMean, DataType.FLOAT, ['batch_size', L, d]);
    g.output(g.node('Cast', [countFinal], { to: DataType.INT64 }), LOOP_OUTPUTS.responseTokens, DataType.INT64, ['batch_size']);
  }
  return { inputs: g.inputs.map((x) => x.name), outputs: g.outputs.map((x) => x.name) };
}

function zerosLike(b: GraphBuilder, flags: string): string {
  return b.node('Cast', [b.node('And', [flags, b.node('Not', [flags])])], { to: DataType.INT64 });
}

function scalarTensor(value: number, type: number) {
  return GraphBuilder.tensor([value], [1], type);
}
