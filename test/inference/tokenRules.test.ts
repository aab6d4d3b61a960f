import { responseWeights } from '../../services/inference/onnx/generate';
import { ResponseMean, TokenKind } from '../../services/inference/onnx/responseMean';

/**
 * The activation's token rules (docs/CONCEPTS.md, "Activation"), each by a case made for it:
 * markers never count; whitespace-only tokens count only between content tokens (leading ones
 * are dropped, trailing ones too, also when the answer is cut at its token limit); an empty
 * answer counts nothing. Checked in the host paths' running mean (`ResponseMean`, whose
 * counting the slots engine shares) and in Extract's weights (`responseWeights`), against the
 * counted positions written out here by hand.
 */
const C = 'content' as const;
const W = 'whitespace' as const;
const M = 'marker' as const;

const CASES: { name: string; kinds: TokenKind[]; counted: number[] }[] = [
  { name: 'leading whitespace is dropped', kinds: [W, W, C, C], counted: [2, 3] },
  { name: 'trailing whitespace is dropped', kinds: [C, W, W], counted: [0] },
  { name: 'whitespace between content counts', kinds: [C, W, W, C], counted: [0, 1, 2, 3] },
  { name: 'markers never count, even between content', kinds: [M, C, M, W, C, M], counted: [1, 3, 4] },
  { name: 'a stop token (a marker) ends nothing it should count', kinds: [W, C, W, C, M], counted: [1, 2, 3] },
  { name: 'an answer cut at its token limit after whitespace', kinds: [C, C, W], counted: [0, 1] },
  { name: 'whitespace only', kinds: [W, W], counted: [] },
  { name: 'an empty answer', kinds: [], counted: [] },
];

const L = 2;
const d = 3;
/** Token i's hidden state at layer l: distinct for every (i, l, x), so the mean shows exactly which tokens were summed. */
const row = (i: number, l: number) => Float64Array.from({ length: d }, (_, x) => 2 ** i + 1000 * l + x / 10);

describe('the activation\'s token rules, case by case', () => {
  it.each(CASES)('host mean: $name', ({ kinds, counted }) => {
    const mean = new ResponseMean(L, d);
    kinds.forEach((k, i) => mean.add(k, (l) => row(i, l)));
    expect(mean.tokens).toBe(counted.length);
    const want = new Float32Array(L * d);
    if (counted.length) {
      for (let l = 0; l < L; l++) for (let x = 0; x < d; x++) want[l * d + x] = counted.reduce((s, i) => s + row(i, l)[x], 0) / counted.length;
    }
    expect(Array.from(mean.mean())).toEqual(Array.from(want));
  });

  it.each(CASES)('Extract\'s weights: $name', ({ kinds, counted }) => {
    expect(responseWeights(kinds)).toEqual(kinds.map((_, i) => (counted.includes(i) ? 1 : 0)));
  });
});
