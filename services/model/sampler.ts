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
 * `sampleTokens` and each row's `k` most probable ids with their probabilities (sorted, ties by
 * id), sliced from the sort the sampler makes anyway: the candidates `candidatesOf` gives.
 */
export function sampleTokensAndCandidates(b: GraphBuilder, logits: string, temperature: string, topP: string, uniform: string, k: number): { tokens: string; probs: string; ids: string } {
  const { tokens, sortedP, sortedIdx } = sampleSorted(b, logits, temperature, topP, uniform);
  const first = (x: string) => b.node('Slice', [x, b.constInt64([0]), b.constInt64([k]), b.constInt64([-1])]);
  return { tokens, probs: first(sortedP), ids: first(sortedIdx) };
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

function sampleSorted(b: GraphBuilder, logits: string, temperature: string, topP: string, uniform: string): { tokens: string; sortedP: string; sortedIdx: string } {
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
  const keptP = b.node('Where', [keep, orderP, b.constFloat([0], [])]);
  const keptCumulative = b.node('CumSum', [keptP, b.constInt64([-1], [])]);
  const mass = b.node('ReduceSum', [keptP, b.constInt64([-1])], { keepdims: 1 });
  const threshold = b.node('Mul', [b.node('Unsqueeze', [uniform, b.constInt64([1])]), mass]);
  const below = b.node('ReduceSum', [b.node('Cast', [b.node('LessOrEqual', [keptCumulative, threshold])], { to: DataType.INT64 }), b.constInt64([-1])], { keepdims: 1 });
  const keptCount = b.node('ReduceSum', [b.node('Cast', [keep], { to: DataType.INT64 }), b.constInt64([-1])], { keepdims: 1 });
  const position = b.node('Min', [below, b.node('Sub', [keptCount, b.constInt64([1], [])])]);
  const drawn = b.node('Squeeze', [b.node('GatherElements', [orderIdx, position], { axis: 1 }), b.constInt64([1])]);
  const greedy = b.node('ArgMax', [logits], { axis: -1, keepdims: 0 });
  return { tokens: b.node('Where', [hot, drawn, greedy]), sortedP, sortedIdx };
}
