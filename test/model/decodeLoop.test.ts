import * as path from 'node:path';
import * as ort from 'onnxruntime-node';
import { LOOP_INPUTS as I, LOOP_OUTPUTS as O, MODEL_FILES, NO_TOKEN } from '../../services/contracts/modelDirectory';
import { tinyLlama } from '../helpers/model';
import { referenceForward, relativeError } from '../reference/forward';

/**
 * The generation graph (services/model/decodeLoop.ts) run directly, its inputs made by hand, and
 * checked against the float64 forward pass of test/reference: in one left-padded batch, a row that
 * generates greedily (the reference's argmax at each step; its mean over the fed tokens) and a row
 * that only measures its prompt (Extract: the mean over the positions its weights mark); a stop
 * token ends a row, is written but never fed; a row with nothing to sample writes NO_TOKEN.
 */
let checkpoint: string;
let session: ort.InferenceSession;
let vocab: number;
let L: number;
let d: number;

const promptA = [17, 301, 45, 1022, 8, 77];
const promptB = [5, 640, 91, 12];

beforeAll(async () => {
  let modelDir: string;
  ({ checkpoint, modelDir } = await tinyLlama({ capture: true }));
  session = await ort.InferenceSession.create(path.join(modelDir, MODEL_FILES.decodeLoop));
  const ref = referenceForward(checkpoint, [1]);
  L = ref.hidden.length;
  d = ref.hidden[0].length;
  vocab = ref.logits.length;
});
afterAll(() => session?.release());

const i64 = (values: number[], dims: number[]) => new ort.Tensor('int64', BigInt64Array.from(values.map(BigInt)), dims);
const f32 = (values: number[], dims: number[]) => new ort.Tensor('float32', Float32Array.from(values), dims);

/** Row A generates up to `maxNew` tokens greedily; row B (left-padded by 2) is measured over its last 3 positions. */
async function run(maxNew: number, stop: number[]) {
  const P = promptA.length;
  const pad = P - promptB.length;
  const feeds: Record<string, ort.Tensor> = {
    [I.inputIds]: i64([...promptA, ...new Array(pad).fill(0), ...promptB], [2, P]),
    [I.attentionMask]: i64([...new Array(P).fill(1), ...new Array(pad).fill(0), ...new Array(promptB.length).fill(1)], [2, P]),
    [I.positionIds]: i64([...promptA.map((_, i) => i), ...new Array(pad).fill(0), ...promptB.map((_, i) => i)], [2, P]),
    [I.promptWeights]: f32([...new Array(P).fill(0), ...new Array(P - 3).fill(0), 1, 1, 1], [2, P]),
    [I.maxSteps]: i64([10], []),
    [I.maxNewTokens]: i64([maxNew, 0], [2]),
    [I.temperature]: f32([0, 0], [2]),
    [I.topP]: f32([1, 1], [2]),
    [I.uniforms]: f32([0.5, 0.5, 0.5, 0.5], [2, 2]),
    [I.stopTokenIds]: i64(stop, [stop.length]),
    [I.tokenKinds]: i64(new Array(vocab).fill(0), [vocab]),
  };
  const out = await session.run(feeds);
  const tokens = out[O.tokens];
  const [iterations] = tokens.dims as number[];
  const data = [...(tokens.data as BigInt64Array)].map(Number);
  return {
    rowA: Array.from({ length: iterations }, (_, t) => data[t * 2]),
    rowB: Array.from({ length: iterations }, (_, t) => data[t * 2 + 1]),
    mean: out[O.responseMean].data as Float32Array,
    counts: [...(out[O.responseTokens].data as BigInt64Array)].map(Number),
  };
}

/** The reference's greedy continuation of a prompt. */
function greedy(prompt: number[], n: number): number[] {
  const ids = [...prompt];
  for (let k = 0; k < n; k++) {
    const { logits } = referenceForward(checkpoint, ids);
    const last = logits.subarray((ids.length - 1) * vocab);
    ids.push(last.indexOf(Math.max(...last)));
  }
  return ids.slice(prompt.length);
}

/** The reference's per-layer mean of the hidden states over the last `n` positions of `ids`. */
function meanOfLast(ids: number[], n: number): Float64Array {
  const { hidden } = referenceForward(checkpoint, ids);
  const out = new Float64Array(L * d);
  for (let l = 0; l < L; l++) {
    const S = ids.length;
    for (let s = S - n; s < S; s++) for (let j = 0; j < d; j++) out[l * d + j] += hidden[l][s * d + j] / n;
  }
  return out;
}

describe('the generation graph', () => {
  it('generates the reference\'s greedy tokens beside a row that only measures, with both means', async () => {
    const expected = greedy(promptA, 3);
    const r = await run(3, [vocab - 1]);
    // Iterations: the prefill and two steps sample; the last feeds the third token and samples none.
    expect(r.rowA).toEqual([...expected, NO_TOKEN]);
    expect(r.rowB).toEqual([NO_TOKEN, NO_TOKEN, NO_TOKEN, NO_TOKEN]);
    expect(r.counts).toEqual([3, 3]);
    const meanA = r.mean.subarray(0, L * d);
    const meanB = r.mean.subarray(L * d, 2 * L * d);
    expect(relativeError(meanA, meanOfLast([...promptA, ...expected], 3))).toBeLessThanOrEqual(1e-4);
    expect(relativeError(meanB, meanOfLast(promptB, 3))).toBeLessThanOrEqual(1e-4);
    // Not vacuous: the two rows' means differ.
    expect(relativeError(meanA, meanOfLast(promptB, 3))).toBeGreaterThan(1e-2);
  });

  it('ends a row at a stop token, which is written but neither fed nor counted', async () => {
    const [first, second] = greedy(promptA, 2);
    const r = await run(5, [second]);
    expect(r.rowA).toEqual([first, second]);
    expect(r.counts[0]).toBe(1);
    expect(relativeError(r.mean.subarray(0, L * d), meanOfLast([...promptA, first], 1))).toBeLessThanOrEqual(1e-4);
  });
});
