import * as path from 'node:path';
import { extractionJob, generationJob } from '../../services/inference/onnx/generate';
import { LoadedModel } from '../../services/inference/onnx/model';
import type { SequenceJob, SequenceResult } from '../../services/inference/onnx/runner';
import { CancelledError, PrefillStats, SlotRunner, StepStats } from '../../services/inference/onnx/slotEngine';
import { buildModel } from '../../services/model/build';
import { TinyArch, writeTinyCheckpoint } from '../../services/model/tiny';
import { tempDir } from '../kit/files';
import { relativeError } from '../reference/forward';

/**
 * Continuous batching over the step graph's slots, against the host loop running each item
 * alone (the portable graph, sampling and sums on the host: shares no code with the slots but
 * the sampler and the counting rules): an item's text and activation do not depend on its
 * slot, its neighbours or the step at which it joined; the generated mean equals Extract's;
 * a cancelled item frees its slot; a reused slot carries nothing; a failing item fails alone.
 */
const QUESTIONS = ['Hi.', 'What do you do when the storm comes and the lamp goes out?', 'Name a bird.', 'Tell me about the sea at night, the boats, and the people who wait for them.', 'Why?', 'Count the waves.'];

async function built(arch: TinyArch): Promise<string> {
  const dir = tempDir(`slots-${arch}`);
  await writeTinyCheckpoint({ arch, out: path.join(dir, 'ckpt'), seed: 3, merges: 2000 });
  await buildModel({ hf: path.join(dir, 'ckpt'), out: path.join(dir, 'model'), capture: true, decodeLoop: false });
  return path.join(dir, 'model');
}

function jobs(model: LoadedModel): SequenceJob[] {
  return QUESTIONS.map((q, i) => {
    const messages = model.chat.supportsSystemPrompt() ? [{ role: 'system', content: 'You are a lighthouse keeper.' }, { role: 'user', content: q }] : [{ role: 'user', content: `You are a lighthouse keeper.\n\n${q}` }];
    // Budgets of 3..18 tokens, so items end at different steps and others take their slots.
    const sampling = { temperature: i % 3 === 0 ? 0 : 0.8, topP: 0.9, maxNewTokens: 3 + 3 * i, maxContext: 2048, seed: 0, enableThinking: false };
    return generationJob(model, { messages, sampling, seed: 500 + i, layers: [] });
  });
}

function expectSame(got: SequenceResult, want: SequenceResult): void {
  expect({ ids: got.responseIds, stopped: got.stopped, counted: got.counted }).toEqual({ ids: want.responseIds, stopped: want.stopped, counted: want.counted });
  // An answer with no counted token has an all-zero mean (the relative error would be 0/0).
  if (want.counted === 0) expect(got.mean.every((v) => v === 0)).toBe(true);
  else expect(relativeError(got.mean, want.mean)).toBeLessThanOrEqual(1e-4);
}

const slotsOf = (m: LoadedModel) => m.runner as SlotRunner;

describe.each([['llama'], ['gemma2']] as [TinyArch][])('%s: the slots engine', (arch) => {
  let modelDir: string;
  let host: LoadedModel;
  let alone: SequenceResult[];
  const steps: StepStats[] = [];

  beforeAll(async () => {
    modelDir = await built(arch);
    host = await LoadedModel.load(modelDir, { decode: 'host' });
    alone = [];
    for (const j of jobs(host)) alone.push((await host.runner.run([j]))[0]);
  });
  afterAll(() => host?.close());

  const prefills: PrefillStats[] = [];
  const load = (slots: number, extra: { staticBatches?: boolean; slotLength?: number; prefixReuse?: boolean; runtime?: 'native' | 'stock'; policy?: 'fifo' | 'chat-first'; chatSlots?: number; joinPrompts?: boolean; prefillChunk?: number } = {}) =>
    LoadedModel.load(modelDir, {
      decode: 'slots',
      slots: { slots, slotLength: extra.slotLength ?? 256, prefillChunk: extra.prefillChunk ?? 7, policy: extra.policy ?? 'fifo', chatSlots: extra.chatSlots, staticBatches: extra.staticBatches, prefixReuse: extra.prefixReuse, runtime: extra.runtime, joinPrompts: extra.joinPrompts, onStep: (s) => steps.push(s), onPrefill: (p) => prefills.push({ tokens: p.tokens, reused: p.reused, ...(p.joined ? { joined: true } : {}) }) },
    });

  it('gives each item the text and activation it gets alone, whatever its slot, neighbours and joining step', async () => {
    expect(alone.some((r) => r.responseIds.length >= 10)).toBe(true);
    // Prompts join the decoding step's run by default (the first batch has runs of its own):
    // their last chunk of 7 tokens, or (chunks of 64) the whole of what is not reused. The last case runs every prompt alone.
    for (const [slots, order, joinPrompts, prefillChunk] of [[3, [0, 1, 2, 3, 4, 5], true, 7], [2, [5, 3, 1, 0, 2, 4], true, 7], [6, [4, 0, 5, 1, 3, 2], true, 7], [2, [1, 4, 0, 5, 2, 3], true, 64], [3, [0, 1, 2, 3, 4, 5], false, 7]] as [number, number[], boolean, number][]) {
      const m = await load(slots, { joinPrompts, prefillChunk });
      try {
        steps.length = 0;
        prefills.length = 0;
        const all = jobs(m);
        const results = await Promise.all(order.map((i) => slotsOf(m).engine.submit(all[i], false)));
        order.forEach((i, k) => expectSame(results[k], alone[i]));
        expect(Math.max(...steps.map((s) => s.active))).toBeLessThanOrEqual(slots);
        // Gaps are closed (free slots filled, or the highest items moved down): a step runs only busy rows.
        expect(steps.filter((s) => s.rows !== s.active)).toEqual([]);
        if (slots === 6) expect(new Set(steps.map((s) => s.rows)).size).toBeGreaterThan(3);
        // Items joined while others were decoding: some step ran fewer items than there were slots, others as many.
        if (slots < 6) expect(steps.some((s) => s.active === slots)).toBe(true);
        // The items after the first batch joined a step (joining off: none did).
        expect(prefills.filter((p) => p.joined).length).toBe(joinPrompts && slots < 6 ? 6 - slots : 0);
      } finally {
        await m.close();
      }
    }
  });

  it('static batching (the benchmark\'s baseline) gives the same results', async () => {
    const m = await load(3, { staticBatches: true });
    try {
      steps.length = 0;
      const results = await Promise.all(jobs(m).map((j) => slotsOf(m).engine.submit(j, false)));
      results.forEach((r, i) => expectSame(r, alone[i]));
      // Two batches of 3, each running its 3 rows until its longest item ends.
      const longest = (b: number) => Math.max(...alone.slice(3 * b, 3 * b + 3).map((r) => r.responseIds.length));
      expect(steps.every((s) => s.rows === 3)).toBe(true);
      // An item of n tokens feeds each of them once (the first comes from its prefill; the last is fed so that it is counted).
      expect(steps.length).toBe(longest(0) + longest(1));
    } finally {
      await m.close();
    }
  });

  it('measures during generation what Extract measures over the same tokens', async () => {
    const m = await load(2);
    try {
      const all = jobs(m);
      // The two items with the most counted tokens.
      const longest = alone.map((r, i) => [r.counted, i]).sort((a, b) => b[0] - a[0]).slice(0, 2).map(([, i]) => i);
      expect(alone[longest[1]].counted).toBeGreaterThan(2);
      for (const i of longest) {
        const generated = await slotsOf(m).engine.submit(all[i], false);
        const job = extractionJob(m, [...conversationOf(m, i), { role: 'assistant', content: '' }], { answerIds: generated.responseIds });
        prefills.length = 0;
        const extracted = await slotsOf(m).engine.submit(job, true);
        expect(extracted.counted).toBe(generated.counted);
        // The conversation's start comes from the slot the generation left; every weighted (answer) position is run.
        const answerStart = Array.from(job.weights!).findIndex((w) => w !== 0);
        expect(answerStart).toBeGreaterThan(0);
        expect(prefills).toEqual([{ tokens: job.ids.length, reused: answerStart }]);
        expect(relativeError(extracted.mean, generated.mean)).toBeLessThanOrEqual(1e-4);
      }
    } finally {
      await m.close();
    }
  });

  it('frees the slot of a cancelled item at once, and a reused slot carries nothing from its previous item', async () => {
    const m = await load(1);
    try {
      const all = jobs(m);
      const long = { ...all[5], maxNew: 200, uniforms: new Float32Array(200).fill(0.5) };
      const cancel = new AbortController();
      const first = slotsOf(m).engine.submit(long, false, cancel.signal);
      const next = slotsOf(m).engine.submit(all[4], false);
      const waiting = new AbortController();
      const never = slotsOf(m).engine.submit(all[0], false, waiting.signal);
      waiting.abort();
      await expect(never).rejects.toBeInstanceOf(CancelledError);
      setTimeout(() => cancel.abort(), 30);
      await expect(first).rejects.toThrow('cancelled while generating');
      // The next item ran in the slot the cancelled one held, and got what it gets alone.
      expectSame(await next, alone[4]);
      expect(slotsOf(m).engine.occupied).toBe(0);
    } finally {
      await m.close();
    }
  });

  it('starts a prompt from the keys and values a slot holds of the same start (its own earlier sequence), with the results of a full prefill', async () => {
    const m = await load(1);
    try {
      prefills.length = 0;
      const all = jobs(m);
      const results: SequenceResult[] = [];
      for (const j of all) results.push(await slotsOf(m).engine.submit(j, false));
      results.forEach((r, i) => expectSame(r, alone[i]));
      // What the slot held: the previous prompt and the tokens fed after it (every answer token:
      // the budget ends these answers, or a stop token that is not fed). All but the last
      // prompt token can be reused (it is run to draw the first answer token).
      const expected = all.map((j, i) => (i === 0 ? 0 : shared([...all[i - 1].ids, ...results[i - 1].responseIds], j.ids, j.ids.length - 1)));
      expect(expected.slice(1).every((n) => n > 3)).toBe(true);
      expect(prefills).toEqual(all.map((j, i) => ({ tokens: j.ids.length, reused: expected[i] })));
    } finally {
      await m.close();
    }
  });

  it.each([['native', 'roomy'], ['native', 'tight'], ['stock', 'roomy']] as ['native' | 'stock', 'roomy' | 'tight'][])('copies a shared start from another slot, busy or free (%s runtime, %s slots)', async (runtime, fit) => {
    // Tight slots (the two prompts and 3 tokens): the shared start is more than half a slot, which the native kernel copies whole; roomy (256): head by head.
    const probe = jobs(host);
    const slotLength = fit === 'roomy' ? 256 : Math.max(probe[0].ids.length, probe[2].ids.length) + 3;
    const m = await load(3, { runtime, slotLength });
    try {
      prefills.length = 0;
      const all = jobs(m).map((j) => ({ ...j, maxNew: Math.min(j.maxNew, 3) }));
      const budget = (i: number) => ({ ...all[i], uniforms: all[i].uniforms.subarray(0, 3) });
      // Items 0 and 2 together: 0 is prefilled first, 2 starts from slot 0's rows while it is busy.
      const first = await Promise.all([0, 2].map((i) => slotsOf(m).engine.submit(budget(i), false)));
      const want = await Promise.all([0, 2].map(async (i) => (await host.runner.run([budget(i)]))[0]));
      first.forEach((r, k) => expectSame(r, want[k]));
      expect(prefills[1]).toEqual({ tokens: all[2].ids.length, reused: shared(all[0].ids, all[2].ids, all[2].ids.length - 1) });
      expect(prefills[1].reused).toBeGreaterThan(3);
      expect(2 * prefills[1].reused > slotLength).toBe(fit === 'tight');
      // Without reuse: nothing reused, the same results.
      const plain = await load(3, { runtime, slotLength, prefixReuse: false });
      try {
        prefills.length = 0;
        const again = await Promise.all([0, 2].map((i) => slotsOf(plain).engine.submit(budget(i), false)));
        again.forEach((r, k) => expectSame(r, want[k]));
        expect(prefills.map((p) => p.reused)).toEqual([0, 0]);
      } finally {
        await plain.close();
      }
    } finally {
      await m.close();
    }
  });

  it('shares the slots between runs and chat by the policy: chat-first keeps slots for chat and serves it first, fifo by arrival', async () => {
    for (const policy of ['fifo', 'chat-first'] as const) {
      const m = await load(3, { policy, chatSlots: 1, prefixReuse: false });
      try {
        const all = jobs(m);
        // Who holds a slot when, from each item's first and last sampled token.
        const events: string[] = [];
        const watched = (j: SequenceJob, name: string): SequenceJob => {
          let first = true;
          return {
            ...j,
            onToken: () => {
              if (first) events.push(`+${name}`);
              first = false;
            },
          };
        };
        const runs = [3, 4, 5, 1].map((i) => watched(all[i], `run${i}`));
        const pending = runs.map((j, k) => slotsOf(m).engine.submit(j, false, undefined, 'run').then((r) => (events.push(`-run${[3, 4, 5, 1][k]}`), r)));
        // A chat request arrives while run items wait.
        const chat = slotsOf(m).engine.submit(watched(all[0], 'chat'), false, undefined, 'chat').then((r) => (events.push('-chat'), r));
        const results = await Promise.all([...pending, chat]);
        // Whatever the order, each item's tokens are its own.
        [3, 4, 5, 1, 0].forEach((i, k) => expectSame(results[k], alone[i]));
        const started = events.filter((e) => e.startsWith('+'));
        if (policy === 'fifo') {
          expect(started.slice(0, 3)).toEqual(['+run3', '+run4', '+run5']);
          expect(started.indexOf('+chat')).toBe(4);
        } else {
          // The chat request before every run item that waited with it (the first was in its slot already),
          // and never more than two run items at once (three slots, one kept for chat).
          expect(started.slice(0, 2)).toEqual(['+run3', '+chat']);
          let running = 0;
          for (const e of events) if (e.includes('run')) expect((running += e.startsWith('+') ? 1 : -1)).toBeLessThanOrEqual(2);
        }
      } finally {
        await m.close();
      }
    }
  });

  it('fails an item longer than a slot alone; the other items carry on', async () => {
    const m = await load(2, { slotLength: 80 });
    try {
      const all = jobs(m);
      const tooLong = { ...all[0], ids: Array.from({ length: 90 }, (_, k) => 10 + k) };
      const noRoom = { ...all[0], ids: all[0].ids.concat(Array.from({ length: 78 - all[0].ids.length }, () => 12)), maxNew: 5, uniforms: new Float32Array(5) };
      const settled = await Promise.allSettled([slotsOf(m).engine.submit(tooLong, false), slotsOf(m).engine.submit(noRoom, false), slotsOf(m).engine.submit(all[2], false)]);
      expect(settled[0]).toMatchObject({ status: 'rejected', reason: { message: 'the item needs 93 tokens (90 of prompt, up to 3 new), more than a slot holds (80)' } });
      expect(settled[1]).toMatchObject({ status: 'rejected', reason: { message: 'the item needs 83 tokens (78 of prompt, up to 5 new), more than a slot holds (80)' } });
      expect(settled[2].status).toBe('fulfilled');
      expectSame((settled[2] as PromiseFulfilledResult<SequenceResult>).value, alone[2]);
    } finally {
      await m.close();
    }
  });
});

/** How many first tokens `a` and `b` share, at most `most`. */
function shared(a: number[], b: number[], most: number): number {
  let n = 0;
  while (n < most && n < a.length && n < b.length && a[n] === b[n]) n++;
  return n;
}

function conversationOf(model: LoadedModel, i: number) {
  const q = QUESTIONS[i];
  return model.chat.supportsSystemPrompt() ? [{ role: 'system', content: 'You are a lighthouse keeper.' }, { role: 'user', content: q }] : [{ role: 'user', content: `You are a lighthouse keeper.\n\n${q}` }];
}
