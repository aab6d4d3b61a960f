import * as path from 'node:path';
import { extractionJob } from '../../services/inference/onnx/generate';
import { LoadedModel } from '../../services/inference/onnx/model';
import type { SequenceJob, SequenceResult } from '../../services/inference/onnx/runner';
import { buildModel } from '../../services/model/build';
import { writeTinyCheckpoint } from '../../services/model/tiny';
import { readSafetensors, writeSafetensors } from '../../services/shared/safetensors';
import { tempDir } from '../kit/files';

/**
 * The activation's token rules (docs/CONCEPTS.md, "Activation") in every path that implements
 * them, on answers scripted token by token: a Llama checkpoint whose blocks add nothing
 * (o_proj and down_proj zero: each block passes its input on) and whose head maps each token
 * of the script to the next (each script token is one direction of the hidden space, its
 * embedding SCALE times that direction), so that greedy decoding produces exactly the script
 * and every layer's hidden state at a position is that token's embedding. The expected
 * activation is the mean of the counted positions' embeddings, the positions written out per
 * case. Paths: the host loop (`ResponseMean`), the generation graph (its sums inside the
 * graph), the slots engine (the step graph's sums, weighted by the host), and Extract.
 */
type Kind = 'C' | 'W' | 'M' | 'STOP';
const CASES: { name: string; script: Kind[]; counted: number[] }[] = [
  { name: 'leading whitespace is dropped', script: ['W', 'W', 'C', 'C'], counted: [2, 3] },
  { name: 'trailing whitespace is dropped, the answer ended by a stop token', script: ['C', 'W', 'W', 'STOP'], counted: [0] },
  { name: 'whitespace between content counts', script: ['C', 'W', 'W', 'C'], counted: [0, 1, 2, 3] },
  { name: 'markers never count, even between content', script: ['M', 'C', 'M', 'W', 'C', 'M'], counted: [1, 3, 4] },
  { name: 'a stop token counts nothing and ends the answer', script: ['W', 'C', 'W', 'C', 'STOP'], counted: [1, 2, 3] },
  { name: 'an answer cut at its token limit after whitespace', script: ['C', 'C', 'W'], counted: [0, 1] },
  { name: 'whitespace only', script: ['W', 'W', 'STOP'], counted: [] },
  { name: 'an empty answer', script: ['STOP'], counted: [] },
];
const SCALE = 4;

/** Token ids of each kind in the tiny Llama vocabulary, read from its tokenizer. */
function pools(model: LoadedModel): Record<Kind, number[]> {
  const out: Record<Kind, number[]> = { C: [], W: [], M: [], STOP: [...model.stopIds] };
  for (let id = 0; id < model.metadata.vocab_size; id++) {
    const kind = model.tokenKind(id);
    if (kind === 'marker' && !model.stopIds.has(id)) out.M.push(id);
    else if (kind === 'whitespace') out.W.push(id);
    else if (kind === 'content' && /^[a-z]+$/.test(model.decode([id]))) out.C.push(id);
  }
  return out;
}

/**
 * Rewrites the checkpoint so that, from `start`, greedy decoding follows `chain`: blocks that
 * add nothing, token chain[i] embedded as SCALE along direction i, and a head whose row for
 * chain[i + 1] reads direction i (the last token's direction leads nowhere: every logit 0).
 */
async function script(ckpt: string, start: number, chain: number[]): Promise<void> {
  const file = path.join(ckpt, 'model.safetensors');
  const { tensors } = await readSafetensors(file);
  const embed = tensors['model.embed_tokens.weight'];
  const head = tensors['lm_head.weight'];
  const D = embed.shape[1];
  for (const [name, t] of Object.entries(tensors)) if (/o_proj|down_proj/.test(name)) t.data.fill(0);
  tensors['model.norm.weight'].data.fill(1);
  head.data.fill(0);
  const seq = [start, ...chain];
  seq.forEach((token, i) => {
    embed.data.fill(0, token * D, (token + 1) * D);
    embed.data[token * D + i] = SCALE;
    if (i + 1 < seq.length) head.data[seq[i + 1] * D + i] = 10;
  });
  await writeSafetensors(file, tensors);
}

describe('the activation\'s token rules on scripted answers, in every path', () => {
  let probe: LoadedModel;
  let base: string;

  beforeAll(async () => {
    base = tempDir('scripted');
    await writeTinyCheckpoint({ arch: 'llama', out: path.join(base, 'vocab'), seed: 1, merges: 2000 });
    await buildModel({ hf: path.join(base, 'vocab'), out: path.join(base, 'vocab-model'), capture: true, decodeLoop: false });
    probe = await LoadedModel.load(path.join(base, 'vocab-model'), { decode: 'host' });
  });
  afterAll(() => probe?.close());

  it.each(CASES)('$name', async ({ name, script: kinds, counted }) => {
    const pool = pools(probe);
    const taken: Record<Kind, number> = { C: 1, W: 0, M: 0, STOP: 0 };
    const start = pool.C[0];
    const chain = kinds.map((k) => pool[k][taken[k]++]);
    expect(chain.every((t) => t !== undefined)).toBe(true);
    const dir = path.join(base, name.replace(/\W+/g, '-'));
    await writeTinyCheckpoint({ arch: 'llama', out: path.join(dir, 'ckpt'), seed: 1, merges: 2000 });
    await script(path.join(dir, 'ckpt'), start, chain);
    await buildModel({ hf: path.join(dir, 'ckpt'), out: path.join(dir, 'model'), capture: true, decodeLoop: true });

    const stops = kinds[kinds.length - 1] === 'STOP';
    const answer = stops ? chain.slice(0, -1) : chain;
    const L = probe.metadata.num_layers;
    const D = probe.metadata.hidden_size;
    // Written out: every layer's mean is SCALE / (counted tokens) along each counted token's direction.
    const want = new Float32Array(L * D);
    for (let l = 0; l < L; l++) for (const i of counted) want[l * D + i + 1] = SCALE / counted.length;
    const job = (): SequenceJob => ({ ids: [start], maxNew: kinds.length, temperature: 0, topP: 1, uniforms: new Float32Array(kinds.length) });
    const check = (r: SequenceResult, path: string) => {
      expect({ path, ids: r.responseIds, stopped: r.stopped, counted: r.counted }).toEqual({ path, ids: answer, stopped: stops, counted: counted.length });
      let worst = 0;
      for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(r.mean[i] - want[i]));
      expect({ path, worst: worst <= 1e-5 }).toEqual({ path, worst: true });
    };
    // When the budget ends the script (no stop token), the budget is its length.
    const budget = (j: SequenceJob) => (stops ? j : { ...j, maxNew: answer.length });
    for (const decode of ['host', 'loop', 'slots'] as const) {
      const m = await LoadedModel.load(path.join(dir, 'model'), { decode, ...(decode === 'slots' ? { slots: { slots: 2, slotLength: 64, prefillChunk: 4, policy: 'fifo' as const } } : {}) });
      try {
        check((await m.runner.run([budget(job())]))[0], decode);
        // Extract over the same tokens, after a rendered prompt (blocks that add nothing: the same hidden states).
        const extract = extractionJob(m, [{ role: 'user', content: 'x' }, { role: 'assistant', content: '' }], { answerIds: answer });
        const got = (await m.runner.run([extract]))[0];
        check({ ...got, responseIds: answer, stopped: stops }, `${decode}: Extract`);
      } finally {
        await m.close();
      }
    }
  });
});
