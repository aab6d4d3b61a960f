import { DataType, GraphBuilder } from './graph';

/**
 * Sampling inside a graph, the rule of the host sampler (services/inference/onnx/sampling.ts):
 * greedy at temperature 0; else softmax(logits / t), the nucleus of the sorted probabilities
 * whose preceding mass is below top_p (every token, in id order, at top_p >= 1), and the first
 * token whose cumulative kept mass exceeds u * (kept mass). `logits` [B, V] float32; `temperature`, `topP`, `uniform` [B] float32;
 * returns the tokens [B] int64. Used by the generation graph and the step graph.
 */
export function sampleTokens(b: GraphBuilder, logits: string, temperature: string, topP: string, uniform: string): string {
  return sampleSorted(b, logits, temperature, topP, uniform).tokens;
}

/**
 * `sampleTokens` by a partial sort, and each row's `k` most probable ids with their
 * probabilities (sorted, ties by id: the candidates `candidatesOf` gives, the full sort's first
 * k). Only the work the rows need, each part behind an If:
 *   - a step whose rows are all greedy (temperature 0) takes each row's ArgMax and nothing else
 *     (its candidates are zeros);
 *   - otherwise the rows' probabilities and a TopK of k: when every sampling row's nucleus
 *     (0 < top_p < 1) ends among its k candidates, the draw is made from them (the full sort's
 *     first k, so the same nucleus, order and draw);
 *   - only a step with a row whose nucleus goes past them (or a row at top_p >= 1, which walks
 *     the whole vocabulary in id order) sorts the whole vocabulary, as `sampleTokens` does.
 * Sums over the k candidates instead of the whole sorted vocabulary may round differently in
 * the last bit: a draw differs only where u falls within such a rounding of an edge.
 */
export function sampleTokensAndCandidates(b: GraphBuilder, logits: string, temperature: string, topP: string, uniform: string, k: number): { tokens: string; probs: string; ids: string } {
  const greedy = b.node('ArgMax', [logits], { axis: -1, keepdims: 0 });
  const anyHot = b.node('Greater', [b.node('ReduceMax', [temperature], { keepdims: 0 }), b.constFloat([0], [])]);
  const declare = (g: GraphBuilder, tokens: string, probs: string, ids: string) => {
    g.output(tokens, g.fresh('sampled_tokens'), DataType.INT64, ['batch_size']);
    g.output(probs, g.fresh('sampled_candidate_probs'), DataType.FLOAT, ['batch_size', k]);
    g.output(ids, g.fresh('sampled_candidate_ids'), DataType.INT64, ['batch_size', k]);
  };

  // Some row samples: its probabilities and candidates, then the draw from them or from the full sort.
  const sampling = b.child();
  const { hot, probs } = temperedProbs(sampling, logits, temperature);
  const [candidateP, candidateIdx] = sampling.nodeN('TopK', [probs, sampling.constInt64([k])], 2, { axis: -1, largest: 1, sorted: 1 });
  const cumulative = sampling.node('CumSum', [candidateP, sampling.constInt64([-1], [])]);
  const reached = sampling.node('Gather', [cumulative, sampling.constInt64([k - 1], [])], { axis: 1 });
  // A row is settled by its candidates when it is greedy, or its nucleus (0 < top_p < 1) ends among them.
  const withinCandidates = sampling.node('And', [sampling.node('Less', [topP, sampling.constFloat([1], [])]), sampling.node('GreaterOrEqual', [reached, topP])]);
  const settled = sampling.node('Or', [sampling.node('Not', [hot]), withinCandidates]);
  const fallBack = sampling.node('Greater', [sampling.node('ReduceMax', [sampling.node('Cast', [sampling.node('Not', [settled])], { to: DataType.FLOAT })], { keepdims: 0 }), sampling.constFloat([0], [])]);
  const whole = sampling.child();
  whole.output(sampleSorted(whole, logits, temperature, topP, uniform, greedy).tokens, whole.fresh('whole_vocabulary_tokens'), DataType.INT64, ['batch_size']);
  const partial = sampling.child();
  const p = partial.node('Unsqueeze', [topP, partial.constInt64([1])]);
  const keep = partial.node('Less', [partial.node('Sub', [cumulative, candidateP]), p]);
  const drawn = drawFromNucleus(partial, candidateP, candidateIdx, keep, uniform);
  partial.output(partial.node('Where', [hot, drawn, greedy]), partial.fresh('candidate_tokens'), DataType.INT64, ['batch_size']);
  const tokens = sampling.fresh('tokens');
  sampling.nodeNamed('If', [fallBack], [tokens], { then_branch: { graph: whole.subgraph('draw_from_vocabulary') }, else_branch: { graph: partial.subgraph('draw_from_candidates') } });
  declare(sampling, tokens, candidateP, candidateIdx);

  // Every row greedy: its argmax, no probabilities at all.
  const cold = b.child();
  const dims = cold.node('Concat', [cold.node('Shape', [temperature]), cold.constInt64([k])], { axis: 0 });
  declare(cold, cold.node('Identity', [greedy]), cold.node('ConstantOfShape', [dims], { value: GraphBuilder.tensor([0], [1], DataType.FLOAT) }), cold.node('ConstantOfShape', [dims], { value: GraphBuilder.tensor([0], [1], DataType.INT64) }));

  const [out, outProbs, outIds] = [b.fresh('tokens'), b.fresh('candidate_probs'), b.fresh('candidate_ids')];
  b.nodeNamed('If', [anyHot], [out, outProbs, outIds], { then_branch: { graph: sampling.subgraph('sample_rows') }, else_branch: { graph: cold.subgraph('greedy_rows') } });
  return { tokens: out, probs: outProbs, ids: outIds };
}

/**
 * Each row's `k` most probable ids under softmax(logits / t) and their probabilities [B, k],
 * sorted (ties by id, as ONNX's TopK orders them): for a host that samples (a CPU), the
 * nucleus is almost always among them, so it need not compute and sort the whole vocabulary's
 * probabilities (`sampleFromCandidates`); TopK with a small k selects without a full sort.
 */
export function candidatesOf(b: GraphBuilder, logits: string, temperature: string, k: number): { probs: string; ids: string } {
  const { probs } = temperedProbs(b, logits, temperature);
  const [sortedP, sortedIdx] = b.nodeN('TopK', [probs, b.constInt64([k])], 2, { axis: -1, largest: 1, sorted: 1 });
  return { probs: sortedP, ids: sortedIdx };
}

/** softmax(logits / t) per row, t = 1 for greedy rows (whose `hot` is false). */
function temperedProbs(b: GraphBuilder, logits: string, temperature: string): { hot: string; probs: string } {
  const hot = b.node('Greater', [temperature, b.constFloat([0], [])]);
  const safeT = b.node('Unsqueeze', [b.node('Where', [hot, temperature, b.constFloat([1], [])]), b.constInt64([1])]);
  return { hot, probs: b.node('Softmax', [b.node('Div', [logits, safeT])], { axis: -1 }) };
}

function sampleSorted(b: GraphBuilder, logits: string, temperature: string, topP: string, uniform: string, greedy = b.node('ArgMax', [logits], { axis: -1, keepdims: 0 })): { tokens: string; sortedP: string; sortedIdx: string } {
  const { hot, probs } = temperedProbs(b, logits, temperature);
  const vocabK = b.node('Slice', [b.node('Shape', [probs]), b.constInt64([1]), b.constInt64([2])]);
  const [sortedP, sortedIdx] = b.nodeN('TopK', [probs, vocabK], 2, { axis: -1, largest: 1, sorted: 1 });
  // A row at top_p >= 1 keeps every token and walks them in id order (as the host does, without a sort).
  const p = b.node('Unsqueeze', [topP, b.constInt64([1])]);
  const everything = b.node('GreaterOrEqual', [p, b.constFloat([1], [])]);
  const ids = b.node('Unsqueeze', [b.node('Range', [b.constInt64([0], []), b.node('Squeeze', [vocabK, b.constInt64([0])]), b.constInt64([1], [])]), b.constInt64([0])]);
  const orderP = b.node('Where', [everything, probs, sortedP]);
  const orderIdx = b.node('Where', [everything, ids, sortedIdx]);
  const cumulative = b.node('CumSum', [orderP, b.constInt64([-1], [])]);
  const before = b.node('Sub', [cumulative, orderP]);
  const keep = b.node('Or', [b.node('Less', [before, p]), everything]);
  const drawn = drawFromNucleus(b, orderP, orderIdx, keep, uniform);
  return { tokens: b.node('Where', [hot, drawn, greedy]), sortedP, sortedIdx };
}

/**
 * The draw from ids in nucleus order (`orderP`, `orderIdx` [B, n]) of which `keep` marks the
 * nucleus: the first kept id whose cumulative kept probability exceeds u times the kept mass.
 */
function drawFromNucleus(b: GraphBuilder, orderP: string, orderIdx: string, keep: string, uniform: string): string {
  const keptP = b.node('Where', [keep, orderP, b.constFloat([0], [])]);
  const keptCumulative = b.node('CumSum', [keptP, b.constInt64([-1], [])]);
  const mass = b.node('ReduceSum', [keptP, b.constInt64([-1])], { keepdims: 1 });
  const threshold = b.node('Mul', [b.node('Unsqueeze', [uniform, b.constInt64([1])]), mass]);
  const below = b.node('ReduceSum', [b.node('Cast', [b.node('LessOrEqual', [keptCumulative, threshold])], { to: DataType.INT64 }), b.constInt64([-1])], { keepdims: 1 });
  const keptCount = b.node('ReduceSum', [b.node('Cast', [keep], { to: DataType.INT64 }), b.constInt64([-1])], { keepdims: 1 });
  const position = b.node('Min', [below, b.node('Sub', [keptCount, b.constInt64([1], [])])]);
  return b.node('Squeeze', [b.node('GatherElements', [orderIdx, position], { axis: 1 }), b.constInt64([1])]);
}
