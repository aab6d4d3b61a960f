/**
 * Picks the next token: greedy at temperature 0; otherwise softmax(logits / temperature)
 * restricted to the nucleus (the most probable tokens whose probabilities first reach top_p,
 * as transformers' TopPLogitsWarper keeps them), then the first token whose cumulative kept
 * probability exceeds u times the kept mass. `u` is the item's own uniform for this token, so
 * the choice depends on nothing else in the batch; the generation graph samples the same way.
 */
export function sampleToken(logits: ArrayLike<number>, temperature: number, topP: number, u: number): number {
  const n = logits.length;
  let best = 0;
  for (let i = 1; i < n; i++) if (logits[i] > logits[best]) best = i;
  if (temperature === 0) return best;
  const probs = new Float64Array(n);
  let total = 0;
  const max = logits[best];
  for (let i = 0; i < n; i++) total += probs[i] = Math.exp((logits[i] - max) / temperature);
  for (let i = 0; i < n; i++) probs[i] /= total;
  let candidates: number[];
  if (topP < 1) {
    // The nucleus from a partial sort: the k most probable tokens (in the full sort's order:
    // probability, then id), k growing until they reach top_p. Usually a few dozen of the vocabulary.
    for (let k = Math.min(n, 64); ; k = Math.min(n, k * 4)) {
      candidates = [];
      let cumulative = 0;
      for (const i of mostProbable(probs, k)) {
        candidates.push(i);
        cumulative += probs[i];
        if (cumulative >= topP) break;
      }
      if (cumulative >= topP || k === n) break;
    }
  } else {
    candidates = Array.from({ length: n }, (_, i) => i);
  }
  let mass = 0;
  for (const i of candidates) mass += probs[i];
  let r = u * mass;
  for (const i of candidates) {
    r -= probs[i];
    if (r < 0) return i;
  }
  return candidates[candidates.length - 1];
}

/** The k ids of highest probability (ties: lower id first), in that order: a min-heap of k over one pass. */
function mostProbable(probs: Float64Array, k: number): number[] {
  // `worse(a, b)`: a ranks after b.
  const worse = (a: number, b: number) => probs[a] < probs[b] || (probs[a] === probs[b] && a > b);
  const heap: number[] = [];
  const down = (i: number) => {
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < heap.length && worse(heap[l], heap[m])) m = l;
      if (r < heap.length && worse(heap[r], heap[m])) m = r;
      if (m === i) return;
      [heap[i], heap[m]] = [heap[m], heap[i]];
      i = m;
    }
  };
  for (let id = 0; id < probs.length; id++) {
    if (heap.length < k) {
      heap.push(id);
      for (let i = heap.length - 1; i > 0; ) {
        const parent = (i - 1) >> 1;
        if (!worse(heap[i], heap[parent])) break;
        [heap[i], heap[parent]] = [heap[parent], heap[i]];
        i = parent;
      }
    } else if (worse(heap[0], id)) {
      heap[0] = id;
      down(0);
    }
  }
  return heap.sort((a, b) => (worse(a, b) ? 1 : worse(b, a) ? -1 : 0));
}
