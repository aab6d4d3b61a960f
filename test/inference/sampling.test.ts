import { drawToken, sampleFromCandidates, sampleToken } from '../../services/inference/onnx/sampling';
import type { Candidates } from '../../services/inference/onnx/stepKernel';

/**
 * The sampler's nucleus comes from a partial sort (the k most probable ids, k growing); it must
 * choose exactly what a full sort of the vocabulary chooses (the rule transformers'
 * TopPLogitsWarper applies), ties included. The full-sort sampler here is written apart.
 */
function fullSortSample(logits: number[], temperature: number, topP: number, u: number): number {
  const max = Math.max(...logits);
  const weights = logits.map((x) => Math.exp((x - max) / temperature));
  const total = weights.reduce((a, b) => a + b, 0);
  const p = weights.map((x) => x / total);
  // top_p >= 1 keeps every id, in id order; otherwise the nucleus in probability order.
  const order = topP >= 1 ? p.map((_, i) => i) : p.map((_, i) => i).sort((a, b) => p[b] - p[a] || a - b);
  const kept: number[] = [];
  let cumulative = 0;
  for (const i of order) {
    kept.push(i);
    cumulative += p[i];
    if (cumulative >= topP) break;
  }
  let mass = 0;
  for (const i of kept) mass += p[i];
  let r = u * mass;
  for (const i of kept) {
    r -= p[i];
    if (r < 0) return i;
  }
  return kept[kept.length - 1];
}

describe('sampleToken', () => {
  it('chooses what a full sort chooses, over 400 random vocabularies with ties, temperatures and top_p values', () => {
    let seed = 7;
    const rnd = () => (seed = (seed * 16807) % 2147483647) / 2147483647;
    for (let t = 0; t < 400; t++) {
      const n = 20 + Math.floor(rnd() * 4000);
      // One logit in ten is exactly 1: ties the nucleus must break by id.
      const logits = Float32Array.from({ length: n }, () => (rnd() < 0.1 ? 1 : rnd() * (t % 2 ? 12 : 3)));
      const temperature = 0.2 + 1.5 * rnd();
      const topP = t % 10 === 0 ? 1 : rnd();
      const u = rnd();
      expect(sampleToken(logits, temperature, topP, u)).toBe(fullSortSample(Array.from(logits), temperature, topP, u));
    }
  });

  it('chooses what a full sort chooses over a 32k vocabulary: flat and peaked rows, near-ties a rounding apart, top_p near 0 and near 1', () => {
    let seed = 11;
    const rnd = () => (seed = (seed * 16807) % 2147483647) / 2147483647;
    const n = 32005;
    for (let t = 0; t < 60; t++) {
      // Flat rows (a random-weight model's: a nucleus of thousands), peaked ones (a trained model's: a few ids).
      const spread = [0.5, 4, 30][t % 3];
      const logits = Float32Array.from({ length: n }, () => rnd() * spread);
      // Logits one float32 step apart, and runs of equal ones, around the nucleus' edge.
      for (let k = 0; k < 200; k++) {
        const at = Math.floor(rnd() * n);
        logits[(at + 1) % n] = logits[at];
        logits[(at + 2) % n] = Math.fround(logits[at] * (1 + 2 ** -23));
      }
      const temperature = [0.05, 0.7, 1, 3][t % 4];
      const topP = [1e-6, 0.5, 0.9, 0.999999, rnd()][t % 5];
      const u = rnd();
      expect(sampleToken(logits, temperature, topP, u)).toBe(fullSortSample(Array.from(logits), temperature, topP, u));
    }
  });

  it('is the argmax at temperature 0, the first of equal maxima', () => {
    expect(sampleToken(Float32Array.from([0.5, 3, -1, 3, 2]), 0, 0.9, 0.99)).toBe(1);
  });
});

/** A row's k most probable ids under softmax(logits / t), as the graph gives them: float64 probabilities sorted (ties by id), rounded to float32. */
function candidatesOf(logits: ArrayLike<number>, temperature: number, k: number): Candidates {
  const max = Math.max(...Array.from(logits));
  const w = Array.from(logits, (x) => Math.exp((x - max) / temperature));
  const total = w.reduce((a, b) => a + b, 0);
  const order = w.map((_, i) => i).sort((a, b) => w[b] - w[a] || a - b).slice(0, k);
  return { k, probs: Float32Array.from(order, (i) => w[i] / total), ids: BigInt64Array.from(order, BigInt) };
}

describe('sampling from the graph\'s candidates', () => {
  it('chooses what a full sort chooses where the nucleus ends among the candidates, and gives up where it does not', () => {
    let seed = 23;
    const rnd = () => (seed = (seed * 16807) % 2147483647) / 2147483647;
    let served = 0;
    let refused = 0;
    for (let t = 0; t < 400; t++) {
      const n = 20 + Math.floor(rnd() * 3000);
      const logits = Float32Array.from({ length: n }, () => (rnd() < 0.1 ? 1 : rnd() * (t % 2 ? 12 : 3)));
      const temperature = 0.2 + 1.5 * rnd();
      const topP = 0.05 + 0.9 * rnd();
      const u = rnd();
      const k = [4, 64, 512][t % 3];
      const c = candidatesOf(logits, temperature, k);
      const token = sampleFromCandidates(c.probs, c.ids, topP, u);
      // Where the candidates' mass reaches top_p the nucleus is among them; else nothing is chosen.
      const mass = c.probs.reduce((a, b) => a + b, 0);
      if (mass < topP - 1e-6) {
        expect(token).toBeUndefined();
        refused++;
      } else if (mass > topP + 1e-6) {
        expect(token).toBe(fullSortSample(Array.from(logits), temperature, topP, u));
        served++;
      }
    }
    expect(served).toBeGreaterThan(100);
    expect(refused).toBeGreaterThan(30);
  });

  it('draws from the candidates only at 0 < top_p < 1 with a temperature, else from the logits', () => {
    const logits = Float32Array.from([0.5, 3, -1, 2.9, 2]);
    const c = candidatesOf(logits, 1, 3);
    // Greedy: the logits' argmax; top_p 1: every id in id order (the candidates cannot say).
    expect(drawToken(logits, c, 0, 0, 0.9, 0.99)).toEqual({ token: 1, fromCandidates: false });
    expect(drawToken(logits, c, 0, 1, 1, 0.99)).toEqual({ token: sampleToken(logits, 1, 1, 0.99), fromCandidates: false });
    expect(drawToken(logits, c, 0, 1, 0.6, 0.7)).toEqual({ token: fullSortSample(Array.from(logits), 1, 0.6, 0.7), fromCandidates: true });
    // A nucleus past the 3 candidates: from the logits.
    expect(drawToken(logits, c, 0, 1, 0.99, 0.995)).toEqual({ token: sampleToken(logits, 1, 0.99, 0.995), fromCandidates: false });
    // Row 1 of two rows' candidates.
    const two: Candidates = { k: 3, probs: Float32Array.from([...c.probs, 0.9, 0.05, 0.01]), ids: BigInt64Array.from([...c.ids, 4n, 0n, 2n]) };
    expect(drawToken(logits, two, 1, 1, 0.5, 0.99)).toEqual({ token: 4, fromCandidates: true });
  });
});
