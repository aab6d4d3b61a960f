import * as path from 'node:path';
import { sampleToken } from '../../services/inference/onnx/sampling';
import type { Steering } from '../../services/inference/onnx/steering';
import { StepSession } from '../../services/inference/onnx/stepSession';
import { buildModel } from '../../services/model/build';
import { TINY_ARCHITECTURES, TinyArch, writeTinyCheckpoint } from '../../services/model/tiny';
import { tempDir } from '../kit/files';
import { referenceForward, relativeError } from '../reference/forward';

/**
 * The step graph (f32) and its fixed KV buffers against the float64 forward pass of
 * test/reference, for every architecture: a prefill at once, a prefill in chunks, and
 * token-by-token decoding into the shared buffer give the reference's hidden states and
 * logits; two slots decoding side by side each give their own sequence's.
 */
const idsA = [5, 17, 301, 45, 1022, 8, 77, 9, 640, 12, 33];
const idsB = [91, 12, 5, 700, 3, 64, 18];

const argmax = (x: ArrayLike<number>) => Array.from(x).reduce((best, v, i, all) => (v > all[best] ? i : best), 0);

/** Rows [from, to) of a [positions * width] tensor. */
const rows = (t: ArrayLike<number>, width: number, from: number, to: number) => Array.from(t).slice(from * width, to * width);

describe.each(TINY_ARCHITECTURES.map((a) => [a]))('%s step graph', (arch) => {
  let checkpoint: string;
  let modelDir: string;
  let refA: ReturnType<typeof referenceForward>;
  let refB: ReturnType<typeof referenceForward>;
  let L: number;
  let d: number;
  let V: number;

  beforeAll(async () => {
    const dir = tempDir(`step-${arch}`);
    checkpoint = path.join(dir, 'checkpoint');
    modelDir = path.join(dir, 'model');
    await writeTinyCheckpoint({ arch: arch as TinyArch, out: checkpoint, seed: 3, merges: 2000 });
    await buildModel({ hf: checkpoint, out: modelDir, capture: true, decodeLoop: false });
    refA = referenceForward(checkpoint, idsA);
    refB = referenceForward(checkpoint, idsB);
    L = refA.hidden.length;
    d = refA.hidden[0].length / idsA.length;
    V = refA.logits.length / idsA.length;
  });

  function expectClose(hidden: Float32Array[], logits: Float32Array | undefined, ref: ReturnType<typeof referenceForward>, from: number, to: number) {
    for (let l = 0; l < L; l++) expect(relativeError(hidden[l], rows(ref.hidden[l], d, from, to))).toBeLessThanOrEqual(1e-4);
    if (logits) expect(relativeError(logits, rows(ref.logits, V, from, to))).toBeLessThanOrEqual(1e-4);
  }

  it('refuses a float32 step graph on CUDA, and slots it does not have or cannot hold, naming the numbers', async () => {
    // Refused before onnxruntime is asked: its CUDA GroupQueryAttention is fp16/bf16 only (this machine has no CUDA at all).
    await expect(StepSession.load(modelDir, { slots: 1, slotLength: 16, placement: { provider: 'cuda', deviceId: 0 } })).rejects.toThrow(/computes in float32, which onnxruntime's CUDA GroupQueryAttention does not .*--dtype bf16 \(Gemma 2\) or f16/);
    const session = await StepSession.load(modelDir, { slots: 2, slotLength: 8 });
    await expect(session.prefill(0, idsA)).rejects.toThrow('11 tokens do not fit a slot of 8 (0 held, 11 new)');
    await expect(session.prefill(2, idsB)).rejects.toThrow('slot 2 does not exist (0..1)');
    await expect(session.decode([1, 2, 3])).rejects.toThrow('a decoding step feeds slots 0..k-1 of 2: got 3 tokens');
    expect([...session.lengths]).toEqual([0, 0]);
    await session.close();
  });

  it('prefills at once and in chunks as the reference computes', async () => {
    const session = await StepSession.load(modelDir, { slots: 1, slotLength: 16 });
    const whole = await session.prefill(0, idsA, { logits: 'all' });
    expectClose(whole.hidden, whole.logits, refA, 0, idsA.length);
    session.reset(0);
    const chunked = await session.prefill(0, idsA, { chunk: 3, logits: 'all' });
    expectClose(chunked.hidden, chunked.logits, refA, 0, idsA.length);
    expect(session.lengths[0]).toBe(idsA.length);
    // 'last': the last position's logits only.
    session.reset(0);
    // The chunks before the last run no logits position (the head's weights are not read).
    const kernel = session.kernel;
    const positions: number[] = [];
    const run = kernel.run.bind(kernel);
    kernel.run = (f) => (positions.push(f.logitsPositions!.length), run(f));
    const last = await session.prefill(0, idsA, { chunk: 4 });
    expect(relativeError(last.logits, rows(refA.logits, V, idsA.length - 1, idsA.length))).toBeLessThanOrEqual(1e-4);
    expectClose(last.hidden, undefined, refA, 0, idsA.length);
    expect(positions).toEqual([0, 0, 1]);
    // 'none' (an Extract's): no position in any run, and the hidden states as before.
    session.reset(0);
    positions.length = 0;
    const none = await session.prefill(0, idsA, { chunk: 4, logits: 'none' });
    expect(positions).toEqual([0, 0, 0]);
    expect(none.logits.length).toBe(0);
    expectClose(none.hidden, undefined, refA, 0, idsA.length);
    await session.close();
  });

  it('decodes token by token into the shared buffer, two slots side by side', async () => {
    const session = await StepSession.load(modelDir, { slots: 2, slotLength: 16 });
    await session.prefill(0, idsA.slice(0, 4));
    await session.prefill(1, idsB.slice(0, 2));
    // Slot 0 feeds idsA[4..], slot 1 idsB[2..] while it has tokens left, then idles.
    for (let t = 0; t < idsA.length - 4; t++) {
      const b = idsB[2 + t];
      const out = await session.decode([idsA[4 + t], b]);
      const p = 4 + t;
      for (let l = 0; l < L; l++) expect(relativeError(out.hidden[l].subarray(0, d), rows(refA.hidden[l], d, p, p + 1))).toBeLessThanOrEqual(1e-4);
      expect(relativeError(out.logits.subarray(0, V), rows(refA.logits, V, p, p + 1))).toBeLessThanOrEqual(1e-4);
      if (b !== undefined) {
        const q = 2 + t;
        for (let l = 0; l < L; l++) expect(relativeError(out.hidden[l].subarray(d, 2 * d), rows(refB.hidden[l], d, q, q + 1))).toBeLessThanOrEqual(1e-4);
        expect(relativeError(out.logits.subarray(V, 2 * V), rows(refB.logits, V, q, q + 1))).toBeLessThanOrEqual(1e-4);
      }
    }
    expect([...session.lengths]).toEqual([idsA.length, idsB.length]);
    await session.close();
  });

  it('moves a sequence to a free slot, where it decodes on as the reference', async () => {
    const session = await StepSession.load(modelDir, { slots: 3, slotLength: 16 });
    await session.prefill(0, idsB.slice(0, 3));
    await session.prefill(2, idsA.slice(0, 4));
    await session.move(2, 1);
    expect([...session.lengths]).toEqual([3, 4, 0]);
    await expect(session.move(0, 1)).rejects.toThrow(/slot 1 holds 4 tokens/);
    for (let t = 0; t < 3; t++) {
      const out = await session.decode([idsB[3 + t], idsA[4 + t]]);
      const p = 4 + t;
      for (let l = 0; l < L; l++) expect(relativeError(out.hidden[l].subarray(d, 2 * d), rows(refA.hidden[l], d, p, p + 1))).toBeLessThanOrEqual(1e-4);
      expect(relativeError(out.logits.subarray(V, 2 * V), rows(refA.logits, V, p, p + 1))).toBeLessThanOrEqual(1e-4);
      // Slot 0, untouched by the move, decodes on too.
      expect(relativeError(out.logits.subarray(0, V), rows(refB.logits, V, 3 + t, 4 + t))).toBeLessThanOrEqual(1e-4);
    }
    await session.close();
  });

  it.each([['native'], ['stock']] as const)('runs a joining prompt in the same run as a decoding step (%s runtime): every row as the reference, its sums, its draw, and its slot decodes on', async (runtime) => {
    const session = await StepSession.load(modelDir, { slots: 3, slotLength: 16, runtime });
    expect(session.step.join).toBe(true);
    await session.prefill(0, idsA.slice(0, 4));
    await session.prefill(1, idsB.slice(0, 2));
    // Slot 2 starts from slot 1's first two tokens (a reused prefix, as the engine does), and the next three join the step.
    expect(await session.reusePrefix(2, idsB, 2)).toBe(2);
    const sample = { temperature: 0.9, topP: 0.8, uniform: 0.3 };
    const out = await session.decode([idsA[4], idsB[2]], { sample: [undefined, sample], join: { slot: 2, ids: idsB.slice(2, 5), weights: [0, 1, 1], fresh: true, sample } });
    // Rows 0 and 1: the step's; row 2: the joining prompt's last position.
    expect(out.logits.length).toBe(3 * V);
    for (const [r, ref, p] of [[0, refA, 4], [1, refB, 2], [2, refB, 4]] as const) expect(relativeError(out.logits.subarray(r * V, (r + 1) * V), rows(ref.logits, V, p, p + 1))).toBeLessThanOrEqual(1e-4);
    // Hidden states are the step's rows' only.
    for (let l = 0; l < L; l++) {
      expect(out.hidden[l].length).toBe(2 * d);
      expect(relativeError(out.hidden[l].subarray(0, d), rows(refA.hidden[l], d, 4, 5))).toBeLessThanOrEqual(1e-4);
    }
    // Each row drawn by its own parameters (row 0 greedy), the joining row's too.
    expect(Number(out.tokens![0])).toBe(argmax(out.logits.subarray(0, V)));
    for (const r of [1, 2]) expect(Number(out.tokens![r])).toBe(sampleToken(out.logits.subarray(r * V, (r + 1) * V), sample.temperature, sample.topP, sample.uniform));
    expect([...session.lengths]).toEqual([5, 3, 5]);
    // Its sums: positions 3 and 4 of idsB, weighted 1.
    const sums = await session.readSum(2);
    for (let l = 0; l < L; l++) {
      const want = rows(refB.hidden[l], d, 3, 4).map((x, i) => x + refB.hidden[l][4 * d + i]);
      expect(relativeError(sums.subarray(l * d, (l + 1) * d), want)).toBeLessThanOrEqual(1e-4);
    }
    // The joined slot decodes on from what the joining run wrote.
    const next = await session.decode([idsA[5], idsB[3], idsB[5]]);
    expect(relativeError(next.logits.subarray(2 * V, 3 * V), rows(refB.logits, V, 5, 6))).toBeLessThanOrEqual(1e-4);
    expect(relativeError(next.logits.subarray(V, 2 * V), rows(refB.logits, V, 3, 4))).toBeLessThanOrEqual(1e-4);
    // A joining slot among the step's, or one too full, is refused before anything runs.
    await expect(session.decode([idsA[6], idsB[4]], { join: { slot: 1, ids: [3] } })).rejects.toThrow("a joining prompt goes into a slot after the step's (0..1), not 1");
    await expect(session.decode([idsA[6]], { join: { slot: 2, ids: idsA } })).rejects.toThrow('17 tokens do not fit a slot of 16 (6 held, 11 new)');
    expect([...session.lengths]).toEqual([6, 4, 6]);
    await session.close();
  });

  it('runs a joining prompt with its own interventions beside rows with theirs, as runs of their own do', async () => {
    // Caps at 0 along fixed unit vectors, one experiment per row.
    const capping = (id: string, seed: number): Steering => ({
      id,
      layers: new Map(
        Array.from({ length: L }, (_, l) => {
          const v = Float32Array.from({ length: d }, (_, i) => Math.sin(seed + l * 31 + i * 0.11));
          const n = Math.hypot(...v);
          return [l, { layer: l, unit: v.map((x) => x / n), add: new Float32Array(d), beta: 1, tau: 0, gamma: 0 }];
        }),
      ),
    });
    const [a, b] = [capping('a', 1), capping('b', 2)];
    const alone = await StepSession.load(modelDir, { slots: 2, slotLength: 16 });
    await alone.prefill(0, idsA.slice(0, 4), { steer: a });
    const promptB = await alone.prefill(1, idsB.slice(0, 5), { steer: b });
    const stepA = await alone.decode([idsA[4]], { steer: [a] });
    await alone.close();
    // The interventions change what they touch (this is not a test of nothing).
    expect(relativeError(promptB.logits, rows(refB.logits, V, 4, 5))).toBeGreaterThan(1e-3);
    const joined = await StepSession.load(modelDir, { slots: 2, slotLength: 16 });
    await joined.prefill(0, idsA.slice(0, 4), { steer: a });
    const out = await joined.decode([idsA[4]], { steer: [a], join: { slot: 1, ids: idsB.slice(0, 5), fresh: true, steer: b } });
    expect(relativeError(out.logits.subarray(0, V), stepA.logits)).toBeLessThanOrEqual(1e-5);
    expect(relativeError(out.logits.subarray(V, 2 * V), promptB.logits)).toBeLessThanOrEqual(1e-5);
    // Its slot goes on only with the same experiment.
    await expect(joined.decode([idsA[5], idsB[5]], { steer: [a, undefined] })).rejects.toThrow('slot 1 holds a sequence run with b: it cannot go on with none');
    await joined.close();
  });

  it('samples in the graph by the host sampler\'s rule: greedy, temperature and nucleus, each row with its own uniform', async () => {
    const session = await StepSession.load(modelDir, { slots: 2, slotLength: 40 });
    // On the CPU the engine samples on the host unless told otherwise; asked, the graph draws.
    expect(session.sampleInGraph).toBe(false);
    expect((await session.decode([idsA[0]], { hidden: false })).tokens).toBeUndefined();
    session.reset(0);
    await session.prefill(0, idsA.slice(0, 4));
    const first = await session.prefill(1, idsB.slice(0, 3), { sample: { temperature: 0.8, topP: 0.9, uniform: 0.37 } });
    expect(Number(first.tokens![0])).toBe(sampleToken(first.logits, 0.8, 0.9, 0.37));
    // Flat logits of random weights: a nucleus of many tokens, where the cumulative rule matters.
    const settings = [[0, 1], [0.7, 0.9], [1.3, 0.5], [1, 1], [0.5, 0.99]];
    let drawn = 0;
    for (let t = 0; t < 30; t++) {
      const sample = [0, 1].map((r) => ({ temperature: settings[(t + r) % settings.length][0], topP: settings[(t + r) % settings.length][1], uniform: ((t * 7 + r * 3) % 10) / 10 + 0.05 }));
      const out = await session.decode([idsA[(4 + t) % idsA.length], idsB[(3 + t) % idsB.length]], { sample, hidden: false });
      for (const r of [0, 1]) {
        const want = sampleToken(out.logits.subarray(r * V, (r + 1) * V), sample[r].temperature, sample[r].topP, sample[r].uniform);
        expect(Number(out.tokens![r])).toBe(want);
        if (sample[r].temperature > 0 && want !== argmax(out.logits.subarray(r * V, (r + 1) * V))) drawn++;
      }
    }
    // Not all greedy in disguise: many draws left the most probable token.
    expect(drawn).toBeGreaterThan(3);
    // The steps above mixed the sampler's paths (the nucleus among the candidates; past them or
    // top_p 1: the whole vocabulary's sort). A step of greedy rows only takes each row's argmax.
    const greedy = await session.decode([idsA[1], idsB[1]], { sample: [0, 1].map(() => ({ temperature: 0, topP: 0.9, uniform: 0.5 })), hidden: false });
    for (const r of [0, 1]) expect(Number(greedy.tokens![r])).toBe(argmax(greedy.logits.subarray(r * V, (r + 1) * V)));
    await session.close();
  });

  it('gives the host each row\'s most probable ids under its temperature (the candidates), sorted, whether it draws or not', async () => {
    const session = await StepSession.load(modelDir, { slots: 2, slotLength: 40 });
    const k = session.step.candidates!;
    // The default: the build's 1,024 (or the whole vocabulary, were it smaller).
    expect(k).toBe(Math.min(1024, V));
    expect(session.hostCandidates).toBe(true);
    await session.prefill(0, idsA.slice(0, 4));
    await session.prefill(1, idsB.slice(0, 3));
    const temperatures = [0.7, 1.3];
    const check = (logits: Float32Array, probs: Float32Array, ids: BigInt64Array, temperature: number) => {
      // softmax(logits / t) in float64, apart from the graph.
      const max = Math.max(...logits);
      const w = Array.from(logits, (x) => Math.exp((x - max) / temperature));
      const total = w.reduce((a, b) => a + b, 0);
      const p = w.map((x) => x / total);
      const chosen = new Set(Array.from(ids, Number));
      expect(chosen.size).toBe(k);
      for (let i = 0; i < k; i++) {
        // float32 softmax (onnxruntime's exp and sum) against float64: a few parts in a million.
        expect(Math.abs(probs[i] - p[Number(ids[i])])).toBeLessThanOrEqual(1e-5 * p[Number(ids[i])]);
        if (i > 0) expect(probs[i]).toBeLessThanOrEqual(probs[i - 1]);
      }
      // No id left out is more probable than the least probable one kept (beyond float32's roundings).
      const least = Math.min(...Array.from(ids, (id) => p[Number(id)]));
      for (let id = 0; id < p.length; id++) if (!chosen.has(id)) expect(p[id]).toBeLessThanOrEqual(least * (1 + 1e-5));
    };
    // Through the session, as the engine asks (the graph draws nothing; the host will).
    const sample = temperatures.map((temperature) => ({ temperature, topP: 0.9, uniform: 0.5 }));
    const out = await session.decode([idsA[4], idsB[3]], { sample, candidates: true, hidden: false });
    expect(out.tokens).toBeUndefined();
    for (const r of [0, 1]) check(out.logits.subarray(r * V, (r + 1) * V), out.candidates!.probs.subarray(r * k, (r + 1) * k), out.candidates!.ids.subarray(r * k, (r + 1) * k), temperatures[r]);
    // Asked of a run that also draws in the graph (a GPU's): the first k of the sampler's own sort.
    const seqlens = Int32Array.from([0, 1], (s) => session.lengths[s]);
    const drawn = await session.kernel.run({ firstSlot: 0, batch: 2, length: 1, inputIds: BigInt64Array.of(BigInt(idsA[5]), BigInt(idsB[4])), positionIds: BigInt64Array.from(seqlens, BigInt), seqlensK: seqlens, totalSequenceLength: Math.max(...seqlens) + 1, logitsPositions: BigInt64Array.of(0n), sumWeights: new Float32Array(4), sumMix: Float32Array.of(1, 0, 0, 1, 1, 0, 0, 1), hidden: false, logits: true, candidates: true, sample: { draw: true, temperature: Float32Array.from(temperatures), topP: Float32Array.of(0.9, 0.9), uniform: Float32Array.of(0.2, 0.6) } });
    expect(drawn.tokens?.length).toBe(2);
    for (const r of [0, 1]) check(drawn.logits.subarray(r * V, (r + 1) * V), drawn.candidates!.probs.subarray(r * k, (r + 1) * k), drawn.candidates!.ids.subarray(r * k, (r + 1) * k), temperatures[r]);
    // A step of greedy rows selects nothing (the host takes their argmax from the logits).
    const greedy = await session.decode([idsA[6], idsB[5]], { sample: [0, 1].map(() => ({ temperature: 0, topP: 0.9, uniform: 0.5 })), candidates: true, hidden: false });
    expect(greedy.candidates!.probs.every((p) => p === 0)).toBe(true);
    await session.close();
  });

  it('keeps each slot\'s running sums in the graph: weighted prefill positions, then decoded tokens as the counting rules say', async () => {
    const session = await StepSession.load(modelDir, { slots: 2, slotLength: 16 });
    expect(session.keepsSums).toBe(true);
    // Slot 1 first holds another sequence's sums: a fresh start must not see them.
    await session.prefill(1, idsB, { fresh: true, weights: idsB.map(() => 1) });
    session.reset(1);
    const weights = [0, 0, 1, 0.5, 0, 1];
    await session.prefill(1, idsA.slice(0, 6), { chunk: 4, fresh: true, weights, hidden: false });
    await session.prefill(0, idsB.slice(0, 3), { fresh: true });
    // Tokens 6..10 of A: content, whitespace, whitespace, content (the two wait, then join), whitespace (waits, never joins).
    const content = { sum: 1, pending: 0, flush: true };
    const space = { sum: 0, pending: 1, flush: false };
    for (const [t, w] of [content, space, space, content, space].entries()) await session.decode([idsB[3 + (t % 4)], idsA[6 + t]], { counts: [undefined, w], hidden: false });
    // Expected from the float64 reference: the weighted prompt positions plus positions 6..9.
    const expected = new Float64Array(L * d);
    for (let l = 0; l < L; l++) {
      for (let p = 0; p < 10; p++) {
        const w = p < 6 ? weights[p] : 1;
        for (let x = 0; x < d; x++) expected[l * d + x] += w * refA.hidden[l][p * d + x];
      }
    }
    expect(relativeError(await session.readSum(1), expected)).toBeLessThanOrEqual(1e-4);
    // Slot 0 counted nothing.
    expect(Math.max(...Array.from(await session.readSum(0), Math.abs))).toBe(0);
    // A move carries the sums with the keys and values.
    session.reset(0);
    await session.move(1, 0);
    expect(relativeError(await session.readSum(0), expected)).toBeLessThanOrEqual(1e-4);
    await session.close();
  });

  // Half precision on the CPU: f16 runs (slowly); bf16 cannot pass through onnxruntime-node. Gemma 2 is built in bf16 only.
  if (arch !== 'gemma2') it('in f16, stays near the reference and computes in half precision (not float32 in disguise)', async () => {
    const dir = tempDir(`step-${arch}-f16`);
    await buildModel({ hf: checkpoint, out: path.join(dir, 'model'), capture: true, dtype: 'f16', decodeLoop: false });
    const session = await StepSession.load(path.join(dir, 'model'), { slots: 2, slotLength: 16 });
    const whole = await session.prefill(1, idsA, { logits: 'all' });
    const errors = [...whole.hidden.map((h, l) => relativeError(h, refA.hidden[l])), relativeError(whole.logits, refA.logits)];
    for (const e of errors) expect(e).toBeLessThanOrEqual(2e-2);
    expect(Math.max(...errors)).toBeGreaterThan(1e-5);
    // Decoding into the float16 buffer from a chunked prefill agrees with the whole prefill.
    await session.prefill(0, idsA.slice(0, 6), { chunk: 4 });
    const out = await session.decode([idsA[6], undefined]);
    expect(relativeError(out.logits.subarray(0, V), rows(whole.logits, V, 6, 7))).toBeLessThanOrEqual(1e-2);
    await session.close();
    const bf16 = tempDir(`step-${arch}-bf16`);
    await buildModel({ hf: checkpoint, out: path.join(bf16, 'model'), capture: true, dtype: 'bf16', decodeLoop: false });
    await expect(StepSession.load(path.join(bf16, 'model'), { slots: 1, slotLength: 16 })).rejects.toThrow(/computes in bf16, which needs the native runtime on a GPU \(here: native on cpu\)/);
  });
});
