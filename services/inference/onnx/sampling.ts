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
    const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => probs[b] - probs[a] || a - b);
    candidates = [];
    let cumulative = 0;
    for (const i of order) {
      candidates.push(i);
      cumulative += probs[i];
      if (cumulative >= topP) break;
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
