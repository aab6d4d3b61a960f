import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ChatMessage } from '../../gen/assistant_axis/v1/common';
import { Dtype } from '../../gen/assistant_axis/v1/common';
import { OnnxBackend } from '../../services/inference/onnx/backend';
import { extractOne } from '../../services/inference/onnx/generate';
import { LoadedModel } from '../../services/inference/onnx/model';
import { projectTurns, renderTurns } from '../../services/inference/onnx/projection';
import { DecoderSession } from '../../services/inference/onnx/session';
import { validateProject } from '../../services/inference/validate';
import { buildModel } from '../../services/model/build';
import { writeTinyCheckpoint } from '../../services/model/tiny';
import { encodeTensor } from '../../services/shared/tensor';
import { tempDir } from '../kit/files';
import { UPSTREAM_DATA } from '../kit/stack';
import { referenceForward } from '../reference/forward';

/**
 * Projections of the reference's four persona-drift conversations (real multi-turn talks)
 * against a float64 forward pass over the same tokens, with each turn's place and counted
 * tokens found here another way: the conversation up to the turn rendered with the generation
 * prompt (these templates render earlier turns as they render the last), then the turn's own
 * tokens, counted by the content rules written out again. `make test-long` projects the
 * whole conversations; `make test` the first turns of each (the float64 pass is quadratic).
 */
const TRANSCRIPTS = path.join(path.dirname(UPSTREAM_DATA), 'transcripts', 'persona_drift');
const MAX_TOKENS = process.env.AXIS_TEST_LONG ? Infinity : 1200;

function transcripts(): { file: string; messages: ChatMessage[] }[] {
  return fs
    .readdirSync(TRANSCRIPTS)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .map((file) => ({ file, messages: (JSON.parse(fs.readFileSync(path.join(TRANSCRIPTS, file), 'utf8')) as { conversation: ChatMessage[] }).conversation }));
}

/** Random axis rows [L, d], from a seed. */
function randomAxis(L: number, d: number, seed: number): Float32Array {
  let s = seed;
  const rnd = () => (s = (s * 16807) % 2147483647) / 2147483647 - 0.5;
  return Float32Array.from({ length: L * d }, rnd);
}

/**
 * Each assistant turn's [start, end) in the whole rendering's tokens and the weight of each of
 * its tokens, found without renderTurns: the conversation up to the turn, rendered with the
 * generation prompt, is what the first `start` tokens decode to exactly, and with the turn's
 * text after it, what the first `end` decode to (found by walking the tokens).
 */
function turnsByPrefix(model: LoadedModel, messages: ChatMessage[], ids: number[]): { messageIndex: number; start: number; end: number; weights: number[] }[] {
  const folded = model.chat.supportsSystemPrompt() || messages[0].role !== 'system' ? messages : [{ role: 'user', content: `${messages[0].content}\n\n${messages[1].content}` }, ...messages.slice(2)];
  const shift = folded.length - messages.length;
  const text = (k: number) => (k === 0 ? '' : model.tokenizer.decode(ids.slice(0, k), { skip_special_tokens: false, clean_up_tokenization_spaces: false }));
  const out = [];
  let k = 0;
  for (let i = 0; i < folded.length; i++) {
    if (folded[i].role !== 'assistant') continue;
    const before = model.chat.render(folded.slice(0, i), true);
    while (text(k).length < before.length) k++;
    expect(text(k)).toBe(before);
    const start = k;
    const through = before + folded[i].content.trim();
    while (text(k).length < through.length) k++;
    expect(text(k)).toBe(through);
    const span = ids.slice(start, k);
    // Content rules: from the first to the last token with visible text, whitespace between them counted, special tokens never.
    const visible = span.map((id) => !model.specialIds.has(id) && model.decode([id]).trim() !== '');
    const first = visible.indexOf(true);
    const last = visible.lastIndexOf(true);
    out.push({ messageIndex: i - shift, start, end: k, weights: span.map((id, j) => (first >= 0 && j >= first && j <= last && !model.specialIds.has(id) ? 1 : 0)) });
  }
  return out;
}

/** The conversation's first turns, up to about `max` tokens (whole user-assistant pairs). */
function firstTurns(model: LoadedModel, messages: ChatMessage[], max: number): ChatMessage[] {
  let n = 2;
  while (n + 2 <= messages.length && model.encode(model.chat.render(messages.slice(0, n + 2), false)).length <= max) n += 2;
  return messages.slice(0, n);
}

async function tinyModel(arch: 'llama' | 'gemma2'): Promise<{ checkpoint: string; modelDir: string }> {
  const dir = tempDir(`projection-${arch}`);
  const checkpoint = path.join(dir, 'checkpoint');
  const modelDir = path.join(dir, 'model');
  await writeTinyCheckpoint({ arch, out: checkpoint, seed: 3, merges: 2000 });
  await buildModel({ hf: checkpoint, out: modelDir, capture: true });
  return { checkpoint, modelDir };
}

describe.each(['llama', 'gemma2'] as const)('ProjectConversation on %s', (arch) => {
  let checkpoint: string;
  let modelDir: string;
  let model: LoadedModel;
  let session: DecoderSession;
  beforeAll(async () => {
    ({ checkpoint, modelDir } = await tinyModel(arch));
    model = await LoadedModel.load(modelDir);
    session = await DecoderSession.load(modelDir);
  }, 120_000);
  afterAll(async () => {
    await session?.close();
    await model?.close();
  });

  it(`projects every assistant turn of the four persona-drift conversations as a float64 forward pass does (<= 1e-4; ${arch === 'llama' ? 'a system message rendered' : 'a system message folded into the first user turn'})`, async () => {
    expect(model.chat.supportsSystemPrompt()).toBe(arch === 'llama');
    const { num_layers: L, hidden_size: d } = model.metadata;
    const axis = randomAxis(L, d, 5);
    const unit = Array.from({ length: L }, (_, l) => {
      const row = axis.subarray(l * d, (l + 1) * d);
      const n = Math.hypot(...row);
      return Array.from(row, (x) => x / n);
    });
    for (const t of transcripts()) {
      const messages = [{ role: 'system', content: 'You are a thoughtful assistant.' }, ...firstTurns(model, t.messages, MAX_TOKENS)];
      const rendered = renderTurns(model, messages, false);
      expect(rendered.ids).toEqual(model.encode(model.chat.render(messages.length && !model.chat.supportsSystemPrompt() ? [{ role: 'user', content: `${messages[0].content}\n\n${messages[1].content}` }, ...messages.slice(2)] : messages, false)));
      const expected = turnsByPrefix(model, messages, rendered.ids);
      expect(rendered.turns.map((r) => [r.messageIndex, r.start, r.end])).toEqual(expected.map((e) => [e.messageIndex, e.start, e.end]));
      const got = await projectTurns(session, rendered, { unit: Float64Array.from(unit.flat()), layers: [...Array(L).keys()], targetRow: 1 }, { chunk: 256, tokenProjections: true });
      const { hidden } = referenceForward(checkpoint, rendered.ids);
      expect(got).toHaveLength(expected.length);
      expected.forEach((e, k) => {
        const count = e.weights.reduce((a, b) => a + b, 0);
        expect(got[k].tokens).toBe(count);
        for (let l = 0; l < L; l++) {
          let want = 0;
          e.weights.forEach((w, j) => {
            if (!w) return;
            for (let i = 0; i < d; i++) want += hidden[l][(e.start + j) * d + i] * unit[l][i];
          });
          want /= count;
          expect(Math.abs(got[k].projections[l] - want)).toBeLessThanOrEqual(1e-4 * Math.max(1, Math.abs(want)));
        }
        // Token projections at the target row: every token of the span, counted or not.
        const j = e.end - e.start - 1;
        let last = 0;
        for (let i = 0; i < d; i++) last += hidden[1][(e.start + j) * d + i] * unit[1][i];
        expect(got[k].tokenProjections).toHaveLength(e.end - e.start);
        expect(Math.abs(got[k].tokenProjections![j] - last)).toBeLessThanOrEqual(1e-4 * Math.max(1, Math.abs(last)));
        expect(got[k].counted).toEqual(e.weights.map((w) => w === 1));
      });
    }
  }, 600_000);

  it('gives the same projections whatever the chunk', async () => {
    const { num_layers: L, hidden_size: d } = model.metadata;
    const axis = { unit: Float64Array.from(randomAxis(L, d, 9), (x) => x / 4), layers: [...Array(L).keys()], targetRow: 0 };
    const messages = firstTurns(model, transcripts()[1].messages, 600);
    const rendered = renderTurns(model, messages, false);
    const whole = await projectTurns(session, rendered, axis, { chunk: rendered.ids.length, tokenProjections: false });
    for (const chunk of [1, 37, 128]) {
      const chunked = await projectTurns(session, rendered, axis, { chunk, tokenProjections: false });
      chunked.forEach((t, k) => t.projections.forEach((p, l) => expect(Math.abs(p - whole[k].projections[l])).toBeLessThanOrEqual(1e-5 * Math.max(1, Math.abs(p)))));
    }
  }, 300_000);
});

// Extract renders the prompt alone and appends the answer's tokens: the same tokens as the
// whole rendering where the text before a turn tokenizes alike at a prompt's end (Gemma's
// "model\n" does; the tiny llama tokenizer splits the "\n\n" before a word in the middle of a
// text and not at its end), with the turns' texts as the template renders them (trimmed).
describe('ProjectConversation and Extract', () => {
  let modelDir: string;
  let model: LoadedModel;
  let backend: OnnxBackend;
  beforeAll(async () => {
    ({ modelDir } = await tinyModel('gemma2'));
    model = await LoadedModel.load(modelDir);
    backend = new OnnxBackend({ model: '', modelDirs: [modelDir], capacity: 1, device: 'cpu', decode: 'auto', maxBatch: 4, maxBatchTokens: 4096, gatherMs: 0 });
    await backend.load();
  }, 120_000);
  afterAll(async () => {
    await backend?.close();
    await model?.close();
  });

  it("projects each turn as Extract's activation of the conversation cut after it, dotted with the unit axis (<= 1e-4)", async () => {
    const { num_layers: L, hidden_size: d } = model.metadata;
    const axisData = randomAxis(L, d, 13);
    const messages = firstTurns(model, transcripts()[3].messages, 2000).map((m) => ({ role: m.role, content: m.content.trim() }));
    const input = validateProject({ messages, axis: encodeTensor({ shape: [L, d], data: axisData }, Dtype.DTYPE_F32), axisLayers: [], tokenProjections: false, enableThinking: false, chunkTokens: 100 }, backend.info);
    const out = await backend.project(input);
    expect(out.turns.length).toBe(messages.filter((m) => m.role === 'assistant').length);
    expect(out.turns.length).toBeGreaterThan(1);
    for (const t of out.turns) {
      const a = (await extractOne(model, messages.slice(0, t.messageIndex + 1), [])).activation.data;
      for (let l = 0; l < L; l++) {
        let dot = 0;
        let sq = 0;
        for (let i = 0; i < d; i++) {
          dot += a[l * d + i] * axisData[l * d + i];
          sq += axisData[l * d + i] ** 2;
        }
        const want = dot / Math.sqrt(sq);
        expect(Math.abs(t.projections[l] - want)).toBeLessThanOrEqual(1e-4 * Math.max(1, Math.abs(want)));
      }
    }
  }, 300_000);

  it('refuses a conversation longer than the model\'s context, naming both lengths', async () => {
    const short = path.join(path.dirname(modelDir), 'short-context');
    fs.cpSync(modelDir, short, { recursive: true });
    const config = JSON.parse(fs.readFileSync(path.join(short, 'config.json'), 'utf8'));
    fs.writeFileSync(path.join(short, 'config.json'), JSON.stringify({ ...config, max_position_embeddings: 300 }));
    const b = new OnnxBackend({ model: '', modelDirs: [short], capacity: 1, device: 'cpu', decode: 'auto', maxBatch: 4, maxBatchTokens: 4096, gatherMs: 0 });
    await b.load();
    try {
      const { numLayers: L, hiddenSize: d } = b.info;
      const messages = firstTurns(model, transcripts()[0].messages, 1000);
      const tokens = model.encode(model.chat.render(messages, false)).length;
      expect(tokens).toBeGreaterThan(300);
      const input = validateProject({ messages, axis: encodeTensor({ shape: [L, d], data: randomAxis(L, d, 1) }, Dtype.DTYPE_F32), axisLayers: [], tokenProjections: false, enableThinking: false, chunkTokens: 0 }, b.info);
      await expect(b.project(input)).rejects.toThrow(`the conversation is ${tokens} tokens, longer than the model's context of 300 tokens`);
    } finally {
      await b.close();
    }
  }, 120_000);

  it('refuses bad requests naming the field: axis shape, rows for layers, no assistant turn, an unknown role, a non-finite axis', () => {
    const { numLayers: L, hiddenSize: d } = backend.info;
    const messages = [{ role: 'user', content: 'hi' }, { role: 'assistant', content: 'hello' }];
    const req = (over: object) => ({ messages, axis: encodeTensor({ shape: [L, d], data: new Float32Array(L * d).fill(1) }, Dtype.DTYPE_F32), axisLayers: [] as number[], tokenProjections: false, enableThinking: false, chunkTokens: 0, ...over });
    expect(() => validateProject(req({ axis: encodeTensor({ shape: [L, d + 1], data: new Float32Array(L * (d + 1)) }, Dtype.DTYPE_F32) }), backend.info)).toThrow(`axis: shape [${L},${d + 1}] does not match the model (rows of ${d}`);
    expect(() => validateProject(req({ axisLayers: [0] }), backend.info)).toThrow(`axis: ${L} rows for 1 layers`);
    expect(() => validateProject(req({ axisLayers: [0, L] , axis: encodeTensor({ shape: [2, d], data: new Float32Array(2 * d) }, Dtype.DTYPE_F32) }), backend.info)).toThrow(`layers: layer ${L} does not exist`);
    expect(() => validateProject(req({ messages: [{ role: 'user', content: 'hi' }] }), backend.info)).toThrow('messages: no assistant turn to project');
    expect(() => validateProject(req({ messages: [...messages, { role: 'narrator', content: 'x' }] }), backend.info)).toThrow('messages[2].role: must be system, user or assistant, got "narrator"');
    const nan = new Float32Array(L * d).fill(1);
    nan[7] = NaN;
    expect(() => validateProject(req({ axis: encodeTensor({ shape: [L, d], data: nan }, Dtype.DTYPE_F32) }), backend.info)).toThrow('axis: element 7 is not finite');
    expect(() => validateProject(req({ tokenProjections: true, axisLayers: [0], axis: encodeTensor({ shape: [1, d], data: new Float32Array(d).fill(1) }, Dtype.DTYPE_F32) }), backend.info)).toThrow(`token_projections: read at the target layer ${Math.floor(L / 2)}, which the axis has no row for`);
  });
});
