import type { Candidates } from './stepKernel';

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
  const probs = scratch(n);
  let total = 0;
  const max = logits[best];
  for (let i = 0; i < n; i++) total += probs[i] = Math.exp((logits[i] - max) / temperature);
  for (let i = 0; i < n; i++) probs[i] /= total;
  if (topP >= 1) {
    // Every id, in id order.
    let mass = 0;
    for (let i = 0; i < n; i++) mass += probs[i];
    let r = u * mass;
    for (let i = 0; i < n; i++) {
      r -= probs[i];
      if (r < 0) return i;
    }
    return n - 1;
  }
  const candidates = nucleus(probs, n, probs[best], topP);
  let mass = 0;
  for (const i of candidates) mass += probs[i];
  let r = u * mass;
  for (const i of candidates) {
    r -= probs[i];
    if (r < 0) return i;
  }
  return candidates[candidates.length - 1];
}

/**
 * `sampleToken` from the k most probable ids the graph gives (StepGraphMetadata.candidates:
 * probabilities under the row's temperature, descending, ties by id: the full sort's first k),
 * or undefined when the nucleus does not end among them (the caller then samples from the
 * logits). The same rule as `sampleToken` at 0 < top_p < 1: the nucleus is the first ids whose
 * cumulative probability reaches top_p, and the draw the first whose cumulative kept mass
 * exceeds u times the kept mass; only the probabilities are float32 softmax's instead of the
 * host's float64 (a draw differs only where u falls within a rounding of an edge).
 */
export function sampleFromCandidates(probs: Float32Array, ids: BigInt64Array, topP: number, u: number): number | undefined {
  let cumulative = 0;
  let end = -1;
  for (let k = 0; k < probs.length; k++) {
    cumulative += probs[k];
    if (cumulative >= topP) {
      end = k;
      break;
    }
  }
  if (end < 0) return undefined;
  let r = u * cumulative;
  for (let k = 0; k < end; k++) {
    r -= probs[k];
    if (r < 0) return Number(ids[k]);
  }
  return Number(ids[end]);
}

/**
 * Row `row`'s next token: from the graph's candidates where they hold its nucleus (sampling at
 * 0 < top_p < 1), else from its logits (`logits`: the row's; `sampleToken`). Says whether the
 * candidates served.
 */
export function drawToken(logits: Float32Array, candidates: Candidates | undefined, row: number, temperature: number, topP: number, u: number): { token: number; fromCandidates: boolean } {
  if (candidates && temperature > 0 && topP < 1) {
    const { k } = candidates;
    const token = sampleFromCandidates(candidates.probs.subarray(row * k, (row + 1) * k), candidates.ids.subarray(row * k, (row + 1) * k), topP, u);
    if (token !== undefined) return { token, fromCandidates: true };
  }
  return { token: sampleToken(logits, temperature, topP, u), fromCandidates: false };
}

/** Buckets: four per halving of the probability below the most probable token's, then one for the rest. */
const BUCKETS = 128;
const SHIFT = 18; // of a float64's high word (sign, 11 exponent bits, 20 mantissa bits): 2^20 / 2^18 = 4 buckets per power of two

/**
 * The nucleus in the full sort's order (probability, then id): the most probable ids, up to
 * the first whose cumulative probability reaches top_p (every id, sorted, if none does). Each
 * step of decoding does this for every row, so it avoids sorting the vocabulary: one pass
 * files each id in a bucket by the high word of its probability's float64 (which orders
 * positive floats as their values do, so equal probabilities share a bucket and a bucket's ids
 * all rank before the next one's), the buckets' masses say which ones the nucleus reaches
 * into, and only those ids (usually a few hundred) are sorted. `top`: the highest probability.
 */
function nucleus(probs: Float64Array, n: number, top: number, topP: number): number[] {
  const high = new Uint32Array(probs.buffer, probs.byteOffset, 2 * n);
  const topHigh = new Uint32Array(Float64Array.of(top).buffer)[HIGH];
  const bucketOf = bucketScratch(n);
  const mass = new Float64Array(BUCKETS);
  for (let i = 0; i < n; i++) {
    const b = Math.min(BUCKETS - 1, (topHigh - high[2 * i + HIGH]) >>> SHIFT);
    bucketOf[i] = b;
    mass[b] += probs[i];
  }
  // The buckets the nucleus needs by their masses; one more at a time if the sorted walk
  // (which adds in another order) falls short by a rounding.
  let last = 0;
  for (let reached = mass[0]; reached < topP && last < BUCKETS - 1; ) reached += mass[++last];
  for (;; last++) {
    const candidates: number[] = [];
    for (let i = 0; i < n; i++) if (bucketOf[i] <= last) candidates.push(i);
    candidates.sort((a, b) => probs[b] - probs[a] || a - b);
    let cumulative = 0;
    for (let k = 0; k < candidates.length; k++) {
      cumulative += probs[candidates[k]];
      if (cumulative >= topP) return candidates.slice(0, k + 1);
    }
    if (last >= BUCKETS - 1) return candidates;
  }
}

/** Which 32-bit half of a float64 holds its sign and exponent on this machine. */
const HIGH = new Uint32Array(Float64Array.of(1).buffer)[1] === 0x3ff00000 ? 1 : 0;

// Reused between calls (a step samples every row; fresh arrays each time would keep the garbage collector busy).
let probsScratch = new Float64Array(0);
let bucketsScratch = new Uint8Array(0);
function scratch(n: number): Float64Array {
  if (probsScratch.length < n) probsScratch = new Float64Array(n);
  return probsScratch;
}
function bucketScratch(n: number): Uint8Array {
  if (bucketsScratch.length < n) bucketsScratch = new Uint8Array(n);
  return bucketsScratch;
}
