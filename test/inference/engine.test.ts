import { getMaxListeners } from 'node:events';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { OnnxBackend } from '../../services/inference/onnx/backend';
import { BatchEngine, BatchStats } from '../../services/inference/onnx/engine';
import type { StepStats } from '../../services/inference/onnx/slotEngine';
import * as grpc from '@grpc/grpc-js';
import pino from 'pino';
import { Registry } from 'prom-client';
import { Dtype } from '../../gen/assistant_axis/v1/common';
import { GenerateResponse, InferenceServiceClient } from '../../gen/assistant_axis/v1/inference';
import { inferenceMetrics } from '../../services/inference/metrics';
import { createInferenceService, inferenceGrpcHandlers } from '../../services/inference/service';
import { InferenceServiceBulk } from '../../services/shared/bulkWire';
import { channelOptions, serverOptions } from '../../services/shared/server';
import { extractionJob, extractOne, generateOne, generationJob } from '../../services/inference/onnx/generate';
import { LoadedModel } from '../../services/inference/onnx/model';
import type { SequenceJob, SequenceResult } from '../../services/inference/onnx/runner';
import { buildModel } from '../../services/model/build';
import { TINY_ARCHITECTURES, TinyArch, writeTinyCheckpoint } from '../../services/model/tiny';
import { referenceForward, relativeError } from '../reference/forward';
import { ROOT } from '../kit/stack';
import { tempDir } from '../kit/files';

const root = tempDir('engine');
const golden = JSON.parse(fs.readFileSync(path.join(ROOT, 'test', 'golden', 'golden.json'), 'utf8')) as Record<string, { prompts: number[][]; max_new_tokens: number; greedy_alone: number[][]; greedy_left_padded_batch_f32: number[][] }>;

/** Tiny checkpoint (seed 3, as the golden files) and its build, once per architecture. */
const built = new Map<TinyArch, Promise<{ checkpoint: string; modelDir: string }>>();
function model(arch: TinyArch): Promise<{ checkpoint: string; modelDir: string }> {
  if (!built.has(arch)) {
    built.set(
      arch,
      (async () => {
        const checkpoint = path.join(root, `ckpt-${arch}`);
        const modelDir = path.join(root, `model-${arch}`);
        await writeTinyCheckpoint({ arch, out: checkpoint, seed: 3, merges: 2000 });
        await buildModel({ hf: checkpoint, out: modelDir, capture: true });
        return { checkpoint, modelDir };
      })(),
    );
  }
  return built.get(arch)!;
}

async function both(arch: TinyArch): Promise<{ loop: LoadedModel; host: LoadedModel }> {
  const { modelDir } = await model(arch);
  return { loop: await LoadedModel.load(modelDir, { decode: 'loop' }), host: await LoadedModel.load(modelDir, { decode: 'host' }) };
}

const greedyJob = (ids: number[], maxNew: number): SequenceJob => ({ ids, maxNew, temperature: 0, topP: 1, uniforms: new Float32Array(maxNew) });

/** Conversations of different lengths, so a batch has padding. */
const QUESTIONS = ['Hi.', 'What do you do when the storm comes and the lamp goes out?', 'Name a bird.', 'Tell me about the sea at night, the boats, and the people who wait for them.', 'Why?'];
function conversation(model: LoadedModel, q: string) {
  return model.chat.supportsSystemPrompt() ? [{ role: 'system', content: 'You are a lighthouse keeper.' }, { role: 'user', content: q }] : [{ role: 'user', content: `You are a lighthouse keeper.\n\n${q}` }];
}
const sampling = { temperature: 0.7, topP: 0.9, maxNewTokens: 16, maxContext: 2048, seed: 0, enableThinking: false };
function sampledJobs(model: LoadedModel) {
  return QUESTIONS.map((q, i) => ({ input: { messages: conversation(model, q), sampling, seed: 100 + i, layers: [] }, job: generationJob(model, { messages: conversation(model, q), sampling, seed: 100 + i, layers: [] }) }));
}

function expectSameResults(got: SequenceResult[], want: SequenceResult[], tolerance: number): void {
  expect(got.map((r) => r.responseIds)).toEqual(want.map((r) => r.responseIds));
  expect(got.map((r) => r.stopped)).toEqual(want.map((r) => r.stopped));
  expect(got.map((r) => r.counted)).toEqual(want.map((r) => r.counted));
  got.forEach((r, i) => expect(relativeError(r.mean, want[i].mean)).toBeLessThanOrEqual(tolerance));
}

describe.each(TINY_ARCHITECTURES.map((a) => [a]))('%s', (arch) => {
  it('greedy generation equals transformers\' generate, alone and as one left-padded batch, in both loops', async () => {
    const { loop, host } = await both(arch);
    const want = golden[arch];
    try {
      for (const m of [loop, host]) {
        const jobs = want.prompts.map((p) => greedyJob(p, want.max_new_tokens));
        const alone = [];
        for (const j of jobs) alone.push((await m.runner.run([j]))[0].responseIds);
        const batched = (await m.runner.run(jobs)).map((r) => r.responseIds);
        expect(alone).toEqual(want.greedy_alone);
        expect(batched).toEqual(want.greedy_left_padded_batch_f32);
      }
    } finally {
      await loop.close();
      await host.close();
    }
  });
});

describe.each([['llama'], ['gemma2']] as [TinyArch][])('%s: the engine\'s guarantees', (arch) => {
  let loop: LoadedModel;
  let host: LoadedModel;
  beforeAll(async () => {
    ({ loop, host } = await both(arch));
  });
  afterAll(async () => {
    await loop?.close();
    await host?.close();
  });

  it('the generation graph gives the same tokens and activations as the step-by-step loop (sampled, batch of 5)', async () => {
    const jobs = sampledJobs(loop).map((x) => x.job);
    const viaLoop = await loop.runner.run(jobs);
    const viaHost = await host.runner.run(jobs);
    expect(viaLoop.some((r) => r.responseIds.length > 3)).toBe(true);
    expectSameResults(viaLoop, viaHost, 1e-4);
  });

  it('an item\'s text and activation do not depend on the batch it runs in', async () => {
    for (const m of [loop, host]) {
      const jobs = sampledJobs(m).map((x) => x.job);
      const together = await m.runner.run(jobs);
      const reordered = await m.runner.run([jobs[3], jobs[1]]);
      for (let i = 0; i < jobs.length; i++) {
        const [alone] = await m.runner.run([jobs[i]]);
        expectSameResults([alone], [together[i]], 1e-4);
      }
      expectSameResults(reordered, [together[3], together[1]], 1e-4);
    }
  });

  it('the mean accumulated during generation equals the Extract prefill over the same tokens (<= 1e-4)', async () => {
    for (const m of [loop, host]) {
      const items = sampledJobs(m);
      const generated = await m.runner.run(items.map((x) => x.job));
      const extractJobs = items.map((x, i) => extractionJob(m, [...x.input.messages, { role: 'assistant', content: m.decode(generated[i].responseIds) }], { answerIds: generated[i].responseIds }));
      const extracted = await m.runner.run(extractJobs);
      extracted.forEach((e, i) => {
        expect(e.counted).toBe(generated[i].counted);
        expect(relativeError(e.mean, generated[i].mean)).toBeLessThanOrEqual(1e-4);
      });
    }
  });
});

describe('a model split into stages', () => {
  it('two stages (--layers 0:2 and 2:4) give the same tokens and activations as the whole model', async () => {
    const { checkpoint, modelDir } = await model('llama');
    const stages = [path.join(root, 'stage-0-2'), path.join(root, 'stage-2-4')];
    await buildModel({ hf: checkpoint, out: stages[0], capture: true, layers: [0, 2] });
    await buildModel({ hf: checkpoint, out: stages[1], capture: true, layers: [2, 4] });
    const split = await LoadedModel.load(stages);
    const whole = await LoadedModel.load(modelDir, { decode: 'loop' });
    try {
      expect(split.runner.kind).toBe('host');
      const jobs = sampledJobs(whole).map((x) => x.job);
      expectSameResults(await split.runner.run(jobs), await whole.runner.run(jobs), 1e-5);
    } finally {
      await split.close();
      await whole.close();
    }
  });

  it('refuses stages out of order or with a gap, naming the directory', async () => {
    const stages = [path.join(root, 'stage-0-2'), path.join(root, 'stage-2-4')];
    await expect(LoadedModel.load([stages[1], stages[0]])).rejects.toThrow(/stage-2-4: holds layers 2:4, but the stages before it end at layer 0/);
    await expect(LoadedModel.load([stages[0]])).rejects.toThrow(/the stages end at layer 2 of 4: the last stage is missing/);
    await expect(LoadedModel.load(stages, { decode: 'loop' })).rejects.toThrow(/runs with the host loop/);
  });
});

describe('the batch engine and the onnx backend', () => {
  const options = { model: '', capacity: 8, device: 'cpu', decode: 'auto' as const, maxBatch: 4, maxBatchTokens: 4096, gatherMs: 30 };

  it('batches concurrent items (at most --max-batch), and a bad item fails alone while its batch carries on', async () => {
    const { modelDir } = await model('llama');
    const batches: BatchStats[] = [];
    const backend = new OnnxBackend({ ...options, modelDirs: [modelDir], decode: 'loop', onBatch: (b) => batches.push(b) });
    await backend.load();
    try {
      expect(backend.info.device).toBe('cpu');
      expect(backend.decodeKind).toBe('loop');
      const m = await LoadedModel.load(modelDir);
      const inputs = sampledJobs(m).map((x) => x.input);
      await m.close();
      const tooLong = { ...inputs[0], sampling: { ...sampling, maxContext: 10 } };
      const settled = await Promise.allSettled([...inputs, tooLong].map((input) => backend.generate(input)));
      expect(settled.slice(0, 5).every((s) => s.status === 'fulfilled')).toBe(true);
      expect(settled[5]).toMatchObject({ status: 'rejected', reason: { message: expect.stringMatching(/^messages: the conversation is \d+ tokens, which leaves no room for an answer under max_context 10/) } });
      expect(batches.reduce((n, b) => n + b.size, 0)).toBe(5);
      expect(Math.max(...batches.map((b) => b.size))).toBeLessThanOrEqual(4);
      expect(batches.some((b) => b.size > 1)).toBe(true);

      // The same item alone gives the same text; a layer subset gives those rows.
      const first = (settled[0] as PromiseFulfilledResult<{ text: string; activation: { data: Float32Array } }>).value;
      const again = await backend.generate({ ...inputs[0], layers: [1, 3] });
      expect(again.text).toBe(first.text);
      const d = 64;
      expect(Array.from(again.activation.data)).toEqual([...first.activation.data.subarray(d, 2 * d), ...first.activation.data.subarray(3 * d, 4 * d)]);

      // Extract: answer ids outside the vocabulary are refused, naming the field.
      const answer = [...inputs[0].messages, { role: 'assistant', content: first.text }];
      await expect(backend.extract(answer, [], { answerIds: [999999] })).rejects.toThrow(/response_token_ids: 999999 is not a token id of this model/);
      const ex = await backend.extract(answer, []);
      expect(ex.responseTokens).toBeGreaterThan(0);
    } finally {
      await backend.close();
    }
  });

  it('never falls back silently: --device cuda fails where CUDA is missing, --device auto says it runs on the CPU', async () => {
    const { modelDir } = await model('llama');
    const cudaOnly = new OnnxBackend({ ...options, modelDirs: [modelDir], device: 'cuda' });
    // Installed with ONNXRUNTIME_NODE_INSTALL=skip, onnxruntime-node has no CUDA provider library.
    const ortBin = path.join(path.dirname(require.resolve('onnxruntime-node/package.json')), 'bin', 'napi-v6', 'linux', 'x64');
    expect(fs.existsSync(path.join(ortBin, 'libonnxruntime_providers_cuda.so'))).toBe(false);
    await expect(cudaOnly.load()).rejects.toThrow(/onnxruntime cannot load it on cuda:0/);
    const warnings: string[] = [];
    const auto = new OnnxBackend({ ...options, modelDirs: [modelDir], device: 'auto', warn: (m) => warnings.push(m) });
    await auto.load();
    expect(auto.info.device).toBe('cpu');
    expect(warnings).toEqual([expect.stringMatching(/^--device auto: CUDA did not load .*; running on the CPU$/)]);
    await auto.close();
    await expect(new OnnxBackend({ ...options, modelDirs: [modelDir], device: 'tpu' }).load()).rejects.toThrow(/--device: "tpu" is not cpu, cuda, auto or cuda:N/);
  });

  it('plans its memory: reports slots and slot length, runs at most as many sequences as there are slots, refuses what does not fit', async () => {
    const { modelDir } = await model('llama');
    const infos: string[] = [];
    const roomy = new OnnxBackend({ ...options, modelDirs: [modelDir], slotLength: 128, deviceMemory: '64GiB', info: (m) => infos.push(m) });
    await roomy.load();
    const p = roomy.plan!.devices[0];
    // The plan has room for 256; the engine holds --max-batch (4) of them.
    expect(roomy.decodeKind).toBe('slots');
    expect(roomy.info).toMatchObject({ slots: 4, slotLength: 128, stepRuntime: 'native' });
    expect(infos.some((m) => /^memory plan: cpu: 64\.00 GiB; weights .* 256 slots$/.test(m))).toBe(true);
    await roomy.close();
    // Room for two slots and a half: two; four items run at most two at a time.
    const steps: StepStats[] = [];
    const tight = new OnnxBackend({ ...options, modelDirs: [modelDir], slotLength: 128, deviceMemory: String(Math.floor(p.weightBytes + p.workingBytes + 2.5 * p.bytesPerSlot)), onStep: (s) => steps.push(s) });
    await tight.load();
    try {
      expect(tight.info.slots).toBe(2);
      const m = await LoadedModel.load(modelDir);
      const inputs = sampledJobs(m).map((x) => x.input).slice(0, 4);
      await m.close();
      await Promise.all(inputs.map((input) => tight.generate(input)));
      expect(Math.max(...steps.map((s) => s.active))).toBe(2);
      // A conversation longer than a slot is refused, naming both numbers.
      const long = { ...inputs[0], messages: [{ role: 'user', content: 'lighthouse '.repeat(200) }] };
      await expect(tight.generate(long)).rejects.toThrow(/^messages: the conversation is \d+ tokens, which leaves no room for an answer in a slot of 128 tokens \(--slot-length\)/);
      await expect(tight.extract([...long.messages, { role: 'assistant', content: 'yes' }], [])).rejects.toThrow(/more than a slot holds \(128, --slot-length\)/);
    } finally {
      await tight.close();
    }
    const none = new OnnxBackend({ ...options, modelDirs: [modelDir], slotLength: 128, deviceMemory: String(Math.floor(p.weightBytes + p.workingBytes)) });
    await expect(none.load()).rejects.toThrow(/^the model does not fit the device's memory: cpu: .* weights .* 0 slots; does not fit$/);
    await expect(new OnnxBackend({ ...options, modelDirs: [modelDir], deviceMemory: 'lots' }).load()).rejects.toThrow('--device-memory: "lots" is not a size');
  });

  it('stops generating for a stream its client cancels: the slot is free at once for the next stream', async () => {
    const { modelDir } = await model('llama');
    const steps: StepStats[] = [];
    const backend = new OnnxBackend({ ...options, modelDirs: [modelDir], maxBatch: 1, slotLength: 512, onStep: (s) => steps.push(s) });
    const metrics = inferenceMetrics(new Registry(), { inFlight: () => 0, running: () => 0, batchSize: () => 0 });
    const service = createInferenceService({ backend, wireDtype: Dtype.DTYPE_F32, metrics, log: pino({ level: 'silent' }) });
    expect(await service.load()).toBe(true);
    const server = new grpc.Server(serverOptions());
    server.addService(InferenceServiceBulk, inferenceGrpcHandlers(service, pino({ level: 'silent' })) as grpc.UntypedServiceImplementation);
    const port = await new Promise<number>((resolve, reject) => server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))));
    const client = new InferenceServiceClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), channelOptions());
    try {
      const messages = [{ role: 'user', content: 'Tell me about the sea.' }];
      const long = { itemId: 'r/a/long', messages, sampling: { ...sampling, maxNewTokens: 400, maxContext: 512 }, seed: 1, layers: [], textOnly: false, cappingExperiment: '' };
      const stream = client.generate();
      stream.on('error', () => undefined);
      stream.write(long);
      // Cancel once the item is decoding; the engine lets it go at the next step.
      await new Promise<void>((resolve) => {
        const poll = () => (steps.length >= 3 ? resolve() : setTimeout(poll, 5));
        poll();
      });
      stream.cancel();
      // The next stream sends 20 short items at once: each listens to the stream's one cancel
      // signal while it waits for the only slot, which is no leak, so Node must not warn of one
      // (it does past the signal's listener limit, 10 unless raised).
      const limits: number[] = [];
      const generate = backend.generate.bind(backend);
      backend.generate = (input) => (limits.push(getMaxListeners(input.signal!)), generate(input));
      const next = client.generate();
      const answers = new Promise<GenerateResponse[]>((resolve, reject) => {
        const got: GenerateResponse[] = [];
        next.on('data', (r: GenerateResponse) => got.push(r) === 20 && resolve(got));
        next.on('error', reject);
      });
      for (let i = 0; i < 20; i++) next.write({ ...long, itemId: `r/a/short${i}`, sampling: { ...sampling, maxNewTokens: 4 } });
      const results = await answers;
      next.end();
      for (const result of results) {
        expect(result.error).toBeUndefined();
        expect(result.completionTokens).toBeGreaterThan(0);
      }
      expect(limits.length).toBe(20);
      expect(Math.min(...limits)).toBeGreaterThanOrEqual(1024);
      // The cancelled item stopped well before its 400 tokens: the short one ran after it in the only slot.
      expect(steps.length).toBeLessThan(100);
    } finally {
      client.close();
      server.forceShutdown();
      await backend.close();
    }
  });

  it('keeps padded prompt tokens per batch under --max-batch-tokens', async () => {
    const ran: number[][] = [];
    const runner = {
      kind: 'host' as const,
      placements: [],
      run: async (jobs: SequenceJob[]) => {
        ran.push(jobs.map((j) => j.ids.length));
        return jobs.map(() => ({ responseIds: [], stopped: true, mean: new Float32Array(0), counted: 0 }));
      },
      close: async () => undefined,
    };
    const engine = new BatchEngine(runner, { maxBatch: 8, maxBatchTokens: 100, gatherMs: 5 });
    const lengths = [10, 60, 12, 11, 55, 9];
    await Promise.all(lengths.map((n) => engine.submit(greedyJob(Array.from({ length: n }, () => 1), 1), false)));
    for (const batch of ran) expect(batch.length * Math.max(...batch)).toBeLessThanOrEqual(100);
    expect(ran.flat().sort((a, b) => a - b)).toEqual([...lengths].sort((a, b) => a - b));
    // Similar lengths go together: the two long prompts share a batch, apart from the short ones.
    expect(ran.find((b) => b.includes(60))).toEqual(expect.arrayContaining([60]));
    expect(ran.find((b) => b.includes(60))!.every((n) => n >= 55)).toBe(true);
  });
});

describe('thinking (Qwen 3)', () => {
  const ask = (thinking: boolean) => ({ messages: [{ role: 'user', content: 'Name a bird.' }], sampling: { ...sampling, enableThinking: thinking }, seed: 1, layers: [] });

  it('is off unless asked for: the switch changes the prompt of a template that has it, and of no other', async () => {
    const qwen3 = await LoadedModel.load((await model('qwen3')).modelDir);
    const llama = await LoadedModel.load((await model('llama')).modelDir);
    try {
      const off = qwen3.decode(generationJob(qwen3, ask(false)).ids);
      const on = generationJob(qwen3, ask(true)).ids;
      const think = qwen3.thinking!;
      expect(generationJob(qwen3, ask(false)).ids.filter((id) => id === think.start || id === think.end)).toHaveLength(2);
      expect(on.filter((id) => id === think.start || id === think.end)).toHaveLength(0);
      expect(off).toBe(qwen3.decode(on) + '\n\n\n\n'); // the empty block: markers (not text) and its whitespace
      expect(generationJob(llama, ask(true)).ids).toEqual(generationJob(llama, ask(false)).ids);
      expect(llama.thinking).toBeUndefined();
    } finally {
      await qwen3.close();
      await llama.close();
    }
  });

  it('leaves the thinking block out of the activation: Extract equals a float64 forward pass averaged over the answer after it (<= 1e-4)', async () => {
    const { checkpoint, modelDir } = await model('qwen3');
    const m = await LoadedModel.load(modelDir);
    try {
      const { start, end } = m.thinking!;
      const answer = [start, ...m.encode(' a bird, then '), end, ...m.encode('\n\nA heron.')];
      // Which tokens count, by construction: those of "A heron." (the whitespace before it is trimmed).
      const tail = m.encode('A heron.').length;
      const messages = [...ask(true).messages, { role: 'assistant', content: '' }];
      const job = extractionJob(m, messages, { answerIds: answer, enableThinking: true });
      const counted = Array.from(job.weights!.subarray(job.ids.length - answer.length));
      expect(counted).toEqual([...answer.slice(0, -tail).map(() => 0), ...Array(tail).fill(1)]);
      const got = await extractOne(m, messages, [], { answerIds: answer, enableThinking: true });
      expect(got.responseTokens).toBe(tail);
      const ref = referenceForward(checkpoint, job.ids);
      const { num_layers: L, hidden_size: d } = m.metadata;
      const want = new Float64Array(L * d);
      for (let l = 0; l < L; l++)
        for (let p = job.ids.length - tail; p < job.ids.length; p++) for (let x = 0; x < d; x++) want[l * d + x] += ref.hidden[l][p * d + x] / tail;
      expect(relativeError(got.activation.data, want)).toBeLessThanOrEqual(1e-4);

      // A block the template opened (no <think> in the answer) and one never closed are left out too.
      const opened = extractionJob(m, messages, { answerIds: [...m.encode('plan'), end, ...m.encode('Hi')], enableThinking: true });
      expect(Array.from(opened.weights!.subarray(opened.ids.length - m.encode('plan').length - 1 - m.encode('Hi').length)).filter(Boolean)).toHaveLength(m.encode('Hi').length);
      const unclosed = [...m.encode('Hi'), start, ...m.encode('plan')];
      const cut = extractionJob(m, messages, { answerIds: unclosed, enableThinking: true });
      expect(Array.from(cut.weights!.subarray(cut.ids.length - unclosed.length))).toEqual(unclosed.map((_, i) => (i < m.encode('Hi').length ? 1 : 0)));
    } finally {
      await m.close();
    }
  });

  it('measures a generated answer that thinks again, without its block, and one that does not think as generated', async () => {
    const m = await LoadedModel.load((await model('qwen3')).modelDir);
    try {
      const { start, end } = m.thinking!;
      const plain = await generateOne(m, ask(true));
      // The random model never closes a thinking block by itself: its runner is made to answer
      // with one, so that the backend's handling of a thinking answer is what is checked.
      const scripted = [start, ...m.encode('hm'), end, ...m.encode('A heron.')];
      const real = m.runner;
      m.runner = { ...real, kind: real.kind, placements: real.placements, run: async (jobs) => (await real.run(jobs)).map((r, i) => (jobs[i].maxNew > 0 ? { ...r, responseIds: scripted } : r)), close: () => real.close() };
      const thought = await generateOne(m, ask(true));
      m.runner = real;
      const measured = await extractOne(m, [...ask(true).messages, { role: 'assistant', content: '' }], [], { answerIds: scripted, enableThinking: true });
      expect(Array.from(thought.activation.data)).toEqual(Array.from(measured.activation.data));
      expect(thought.text).toBe('hmA heron.'); // markers are not text; the block's words stay in the answer
      // Without a block, the activation is the one accumulated during generation, as before.
      const again = await generateOne(m, ask(true));
      expect(Array.from(again.activation.data)).toEqual(Array.from(plain.activation.data));
      const ex = await extractOne(m, [...ask(true).messages, { role: 'assistant', content: plain.text }], [], { answerIds: plain.responseIds, enableThinking: true });
      expect(relativeError(ex.activation.data, plain.activation.data)).toBeLessThanOrEqual(1e-4);
    } finally {
      await m.close();
    }
  });
});
