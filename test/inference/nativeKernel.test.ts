import * as fs from 'node:fs';
import * as path from 'node:path';
import { generationJob } from '../../services/inference/onnx/generate';
import { LoadedModel } from '../../services/inference/onnx/model';
import { libraryPath, OrtApi } from '../../services/inference/onnx/native/capi';
import { NativeKernel } from '../../services/inference/onnx/native/nativeKernel';
import type { SequenceJob, SequenceResult } from '../../services/inference/onnx/runner';
import { HostDraws, SlotRunner } from '../../services/inference/onnx/slotEngine';
import { StepRuntime, StepSession } from '../../services/inference/onnx/stepSession';
import { buildModel } from '../../services/model/build';
import { writeTinyCheckpoint } from '../../services/model/tiny';
import { tempDir } from '../kit/files';
import { relativeError } from '../reference/forward';

/**
 * The native step runtime (onnxruntime's C API through koffi, KV buffers from onnxruntime's
 * allocator, IO binding) against the stock one (onnxruntime-node's JavaScript API): the same
 * tokens and activations over many steps, slot reuse and cancellation; the KV buffers bound
 * as past and present by address; memory flat over thousands of items; bad calls that throw.
 */
const QUESTIONS = ['Hi.', 'What do you do when the storm comes?', 'Name a bird.', 'Tell me about the sea at night.', 'Why?', 'Count the waves.', 'Who keeps the lamp?'];

let modelDir: string;

beforeAll(async () => {
  const dir = tempDir('native-kernel');
  await writeTinyCheckpoint({ arch: 'llama', out: path.join(dir, 'ckpt'), seed: 5, merges: 2000 });
  await buildModel({ hf: path.join(dir, 'ckpt'), out: path.join(dir, 'model'), capture: true, decodeLoop: false });
  modelDir = path.join(dir, 'model');
});

const load = (runtime: StepRuntime, slots = 3, onStep?: () => void, sampleInGraph?: boolean) => LoadedModel.load(modelDir, { decode: 'slots', slots: { slots, slotLength: 256, prefillChunk: 7, policy: 'fifo', runtime, onStep, sampleInGraph } });
const engineOf = (m: LoadedModel) => (m.runner as SlotRunner).engine;

function jobs(model: LoadedModel, count: number, budget: (i: number) => number): SequenceJob[] {
  return Array.from({ length: count }, (_, i) => {
    const messages = [{ role: 'system', content: 'You are a lighthouse keeper.' }, { role: 'user', content: QUESTIONS[i % QUESTIONS.length] }];
    const sampling = { temperature: i % 4 === 0 ? 0 : 0.9, topP: 0.9, maxNewTokens: budget(i), maxContext: 2048, seed: 0, enableThinking: false };
    return generationJob(model, { messages, sampling, seed: 900 + i, layers: [] });
  });
}

describe('the native step runtime', () => {
  it('gives the stock runtime\'s tokens (exactly) and activations (<= 1e-6) over many steps, slot reuse and cancellation, sampling in the graph as on a GPU', async () => {
    const outcomes: Record<StepRuntime, (SequenceResult | string)[]> = { native: [], stock: [] };
    for (const runtime of ['native', 'stock'] as const) {
      // Item 5 (a budget of 10 tokens, admitted when items 2 and 4 leave, about step 12) is cancelled at step 16, while it generates.
      const cancel = new AbortController();
      let steps = 0;
      // The native runtime draws tokens in the graph (what it does on CUDA); the stock one on the host, from the logits.
      const m = await load(runtime, 3, () => ++steps === 16 && cancel.abort(), runtime === 'native');
      try {
        expect((m.runner as SlotRunner).step.runtime).toBe(runtime);
        expect((m.runner as SlotRunner).step.sampleInGraph).toBe(runtime === 'native');
        const all = jobs(m, 14, (i) => 2 + ((5 * i) % 17));
        const pending = all.map((j, i) => engineOf(m).submit(j, false, i === 5 ? cancel.signal : undefined));
        const settled = await Promise.allSettled(pending);
        outcomes[runtime] = settled.map((s) => (s.status === 'fulfilled' ? s.value : (s.reason as Error).message));
      } finally {
        await m.close();
      }
    }
    const { native, stock } = outcomes;
    expect([native[5], stock[5]]).toEqual(['cancelled while generating', 'cancelled while generating']);
    native.forEach((n, i) => {
      const s = stock[i];
      if (i === 5) return;
      if (typeof n === 'string' || typeof s === 'string') throw new Error(`item ${i} failed: ${n} / ${s}`);
      expect(n.responseIds).toEqual(s.responseIds);
      expect(n.counted).toBe(s.counted);
      if (s.counted > 0) expect(relativeError(n.mean, s.mean)).toBeLessThanOrEqual(1e-6);
    });
    // Slots were reused: 14 items through 3 slots, most of them longer than one step.
    expect(native.filter((o) => typeof o !== 'string' && o.responseIds.length > 1).length).toBeGreaterThan(6);
  });

  it('draws the same tokens from the graph\'s candidates as from the whole vocabulary\'s logits, on either runtime', async () => {
    const tokens: Record<string, number[][]> = {};
    for (const [name, runtime, hostCandidates] of [['native, candidates', 'native', true], ['native, logits only', 'native', false], ['stock, candidates', 'stock', true]] as const) {
      // The host's draws as the engine reports them to the metrics (each prefill's first token, then each step's).
      const draws = { candidates: 0, vocabulary: 0 };
      const tally = (d?: HostDraws) => d && ((draws.candidates += d.candidates), (draws.vocabulary += d.vocabulary));
      const m = await LoadedModel.load(modelDir, { decode: 'slots', slots: { slots: 3, slotLength: 256, prefillChunk: 7, policy: 'fifo', runtime, hostCandidates, onStep: (st) => tally(st.drawn), onPrefill: (p) => tally(p.drawn) } });
      try {
        expect((m.runner as SlotRunner).step.hostCandidates).toBe(hostCandidates);
        // Greedy, top_p 1 and nucleus items (jobs() makes every fourth greedy; these add top_p 1).
        const all = jobs(m, 12, (i) => 3 + ((7 * i) % 19)).map((j, i) => (i % 6 === 1 ? { ...j, topP: 1 } : j));
        const results = await Promise.all(all.map((j) => engineOf(m).submit(j, false)));
        tokens[name] = results.map((r) => r.responseIds);
        const drawn = results.reduce((n, r) => n + r.responseIds.length + (r.stopped ? 1 : 0), 0);
        // Every token (a stop token included) was drawn once on the host: from the candidates wherever they could serve.
        expect(draws.candidates + draws.vocabulary).toBe(drawn);
        if (hostCandidates) expect(draws.candidates).toBeGreaterThan(drawn / 3);
        else expect(draws.candidates).toBe(0);
      } finally {
        await m.close();
      }
    }
    expect(tokens['native, candidates']).toEqual(tokens['native, logits only']);
    expect(tokens['stock, candidates']).toEqual(tokens['native, logits only']);
  });

  it('binds each layer\'s KV buffer as past and present: the run writes where onnxruntime allocated, no copy', async () => {
    const step = await StepSession.load(modelDir, { slots: 2, slotLength: 32 });
    try {
      expect(step.runtime).toBe('native');
      const kernel = step.kernel as NativeKernel;
      await step.prefill(0, [5, 17, 301, 45]);
      const first = kernel.addresses();
      expect(first.keys.length).toBe(step.metadata.num_layers);
      for (const a of [...first.keys, ...first.values]) expect(first.boundOutputs).toContain(a);
      // Slot 1 alone: a view one slot into each buffer, bound as the present output too.
      await step.prefill(1, [91, 12]);
      const slotBytes = BigInt(step.metadata.num_key_value_heads * 32 * step.metadata.head_dim * 4);
      const second = kernel.addresses();
      for (const a of [...second.keys, ...second.values]) expect(second.boundOutputs).toContain(a + slotBytes);
      // The buffers stayed where they were.
      expect(second.keys).toEqual(first.keys);
      await step.decode([8, 3]);
      expect([...step.lengths]).toEqual([5, 3]);
      // As the engine steps: each layer's running sums are bound in place too, and of what the
      // step writes only the sampled tokens reach host memory (no hidden states, no logits).
      const out = await step.decode([9, 4], { counts: [{ sum: 1, pending: 0, flush: true }, undefined], sample: [{ temperature: 0, topP: 1, uniform: 0 }, undefined], hidden: false, logits: false });
      expect(out.logits.length).toBe(0);
      expect(out.tokens?.length).toBe(2);
      const third = kernel.addresses();
      const L = step.metadata.num_layers;
      expect(third.sums.length).toBe(L);
      for (const a of [...third.keys, ...third.values, ...third.sums]) expect(third.boundOutputs).toContain(a);
      // The tokens, and the idle joining row's small buffers (keys, values, sums of each layer), bound in place too.
      expect(third.boundOutputs.length).toBe(3 * L + 1 + 3 * L);
      // A prompt joining a step: its slot's part of each buffer, bound in place beside the step's.
      step.reset(1);
      await step.decode([10], { join: { slot: 1, ids: [7, 7, 7], fresh: true } });
      const fourth = kernel.addresses();
      for (const a of [...fourth.keys, ...fourth.values]) {
        expect(fourth.boundOutputs).toContain(a);
        expect(fourth.boundOutputs).toContain(a + slotBytes);
      }
      expect([...step.lengths]).toEqual([7, 3]);
    } finally {
      await step.close();
    }
  });

  it('frees what it allocates: a few thousand items leave the process\'s memory flat', async () => {
    const m = await load('native', 4);
    try {
      const runBatch = async (count: number) => {
        const results = await Promise.all(jobs(m, count, () => 2).map((j) => engineOf(m).submit(j, false)));
        return results.length;
      };
      await runBatch(500);
      const before = process.memoryUsage().rss;
      let done = 0;
      for (let b = 0; b < 6; b++) done += await runBatch(500);
      expect(done).toBe(3000);
      const grown = (process.memoryUsage().rss - before) / 2 ** 20;
      // 3000 items are about 9000 runs of some 30 onnxruntime values each: not releasing them grows
      // the process by about 100 MiB (measured); what remains is the JavaScript heap's own noise.
      expect(grown).toBeLessThan(40);
    } finally {
      await m.close();
    }
  }, 120_000);

  it('answers bad calls with a JavaScript error, never a crash', async () => {
    expect(() => OrtApi.open('/nonexistent/libonnxruntime.so.1')).toThrow(/cannot load onnxruntime's library \/nonexistent\/libonnxruntime\.so\.1/);
    expect(() => OrtApi.open(libraryPath(), 999)).toThrow(/whose C API is older than version 999/);
    const step = await StepSession.load(modelDir, { slots: 2, slotLength: 16 });
    const kernel = step.kernel as NativeKernel;
    const feeds = { firstSlot: 0, batch: 1, length: 3, inputIds: BigInt64Array.of(1n, 2n, 3n), positionIds: BigInt64Array.of(0n, 1n, 2n), seqlensK: Int32Array.of(2), totalSequenceLength: 3, logitsPositions: BigInt64Array.of(2n), sumWeights: new Float32Array(6), sumMix: Float32Array.of(1, 0, 0, 1), hidden: false, logits: true, sample: { draw: false, temperature: new Float32Array(1), topP: new Float32Array(1), uniform: new Float32Array(1) } };
    // Data shorter than its shape, a slot that does not exist, a position past the buffer.
    await expect(kernel.run({ ...feeds, inputIds: BigInt64Array.of(1n) })).rejects.toThrow(/onnxruntime, wrapping host memory as a tensor: .*(space|smaller)/);
    await expect(kernel.run({ ...feeds, firstSlot: 1, batch: 2 })).rejects.toThrow(/slots 1\.\.2 are not all among the 2/);
    await expect(kernel.run({ ...feeds, seqlensK: Int32Array.of(40), totalSequenceLength: 41 })).rejects.toThrow(/onnxruntime, running the step graph/);
    // It still runs after those.
    expect((await kernel.run(feeds)).logits.length).toBe(step.metadata.vocab_size);
    // A copy in flight (on onnxruntime's worker thread) refuses a second call, and close waits for it.
    await step.prefill(0, [4, 5, 6]);
    const moving = step.move(0, 1);
    await expect(kernel.run(feeds)).rejects.toThrow(/a run is already in flight/);
    await step.close();
    await moving;
    await step.close();
    await expect(step.decode([1])).rejects.toThrow(/the step session is closed/);
    await expect(step.readSum(1)).rejects.toThrow(/the step session is closed/);
    expect(() => kernel.addresses()).toThrow(/closed/);
  });

  it('fails at load when the device has not the memory for the slots, naming what it was allocating, and loads again after', async () => {
    // 2^36 positions per slot: terabytes of keys and values, more than any machine here has.
    await expect(StepSession.load(modelDir, { slots: 4, slotLength: 2 ** 36 })).rejects.toThrow(/allocating layer 0's KV buffer \([0-9.]+ MiB\) on the session's device/);
    const step = await StepSession.load(modelDir, { slots: 1, slotLength: 16 });
    expect((await step.prefill(0, [5, 6, 7])).logits.length).toBe(step.metadata.vocab_size);
    await step.close();
  });

  it('refuses a model whose step graph predates the in-graph sums and sampling, saying to build it again', async () => {
    const old = path.join(tempDir('native-kernel-old'), 'model');
    fs.cpSync(modelDir, old, { recursive: true });
    const file = path.join(old, 'axis_model.json');
    const metadata = JSON.parse(fs.readFileSync(file, 'utf8'));
    // As the graph of an older build: no in-graph switch for the sampler.
    metadata.step.inputs = metadata.step.inputs.filter((n: string) => n !== 'sample_in_graph');
    fs.writeFileSync(file, JSON.stringify(metadata));
    await expect(StepSession.load(old, { slots: 1, slotLength: 16 })).rejects.toThrow(/built before the running sums and sampling moved into it .*it lacks sample_in_graph\): build it again/);
  });

  it('fails at load, with the reason, when CUDA is asked for and cannot be had (never a silent CPU)', async () => {
    const dir = tempDir('native-kernel-f16');
    const ckpt = path.join(dir, 'ckpt');
    await writeTinyCheckpoint({ arch: 'llama', out: ckpt, seed: 5, merges: 500 });
    await buildModel({ hf: ckpt, out: path.join(dir, 'model'), capture: true, dtype: 'f16', decodeLoop: false });
    await expect(StepSession.load(path.join(dir, 'model'), { slots: 1, slotLength: 16, placement: { provider: 'cuda', deviceId: 0 } })).rejects.toThrow(/the CUDA provider[^:]*: .*library/);
    // (Here onnxruntime-node has no CUDA provider files: the message names the library it could not load.)
  });
});
