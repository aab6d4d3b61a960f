import * as fs from 'node:fs';
import * as path from 'node:path';
import * as ort from 'onnxruntime-node';
import { OnnxBackend } from '../../services/inference/onnx/backend';
import { extractOne, generateOne } from '../../services/inference/onnx/generate';
import { DecoderSession } from '../../services/inference/onnx/session';
import { LoadedModel } from '../../services/inference/onnx/model';
import { NAMES } from '../../services/model/builders/decoder';
import { tinyLlama, variant } from '../helpers/model';
import { referenceForward as llamaForward, relativeError } from '../reference/forward';

const sampling = { temperature: 0.7, topP: 0.9, maxNewTokens: 12, maxContext: 2048, seed: 0, enableThinking: false };
const messages = [
  { role: 'system', content: 'You are a lighthouse keeper on a windy island.' },
  { role: 'user', content: 'What do you do when the storm comes?' },
];

let checkpoint: string;
let modelDir: string;
let model: LoadedModel;
let decoder: DecoderSession;

beforeAll(async () => {
  ({ checkpoint, modelDir } = await tinyLlama());
  model = await LoadedModel.load(modelDir);
  decoder = await DecoderSession.load(modelDir);
});

afterAll(async () => {
  await model?.close();
  await decoder?.close();
});

const backendOptions = { model: '', capacity: 1, device: 'cpu', decode: 'auto' as const, maxBatch: 4, maxBatchTokens: 4096, gatherMs: 0 };

/** The reference mean over response positions, with the trimming rules applied by hand. */
function referenceMean(ids: number[], promptLength: number): Float64Array[] {
  const { hidden } = llamaForward(checkpoint, ids);
  const d = model.metadata.hidden_size;
  const kinds = ids.slice(promptLength).map((id) => model.tokenKind(id));
  const first = kinds.findIndex((k) => k === 'content');
  const last = kinds.length - 1 - [...kinds].reverse().findIndex((k) => k === 'content');
  return hidden.map((h) => {
    const mean = new Float64Array(d);
    let n = 0;
    for (let i = first; i >= 0 && i <= last; i++) {
      if (kinds[i] === 'marker') continue;
      const pos = promptLength + i;
      for (let j = 0; j < d; j++) mean[j] += h[pos * d + j];
      n++;
    }
    return mean.map((v) => v / n);
  });
}

describe('axis-model build', () => {
  it('writes the transformers.js layout, the metadata and the DESIGN.md names', () => {
    for (const f of ['onnx/model.onnx', 'onnx/model.onnx_data', 'config.json', 'tokenizer.json', 'tokenizer_config.json', 'generation_config.json', 'axis_model.json']) {
      expect(fs.existsSync(path.join(modelDir, f))).toBe(true);
    }
    const config = JSON.parse(fs.readFileSync(path.join(modelDir, 'config.json'), 'utf8'));
    expect(config['transformers.js_config']).toEqual({ use_external_data_format: { 'model.onnx': true } });
    const meta = model.metadata;
    expect(meta.inputs).toEqual(['input_ids', 'attention_mask', 'position_ids', ...[0, 1, 2, 3].flatMap((l) => [`past_key_values.${l}.key`, `past_key_values.${l}.value`])]);
    expect(meta.outputs).toEqual(expect.arrayContaining(['logits', 'present.0.key', 'present.3.value', 'hidden_states.0', 'hidden_states.3']));
    expect(meta.hidden_state_outputs).toEqual([0, 1, 2, 3].map(NAMES.hiddenState));
    // Weights are external: the graph itself is small.
    expect(fs.statSync(path.join(modelDir, 'onnx/model.onnx')).size).toBeLessThan(fs.statSync(path.join(modelDir, 'onnx/model.onnx_data')).size / 10);
  });

  it('hidden states and logits match a float64 forward pass written separately (<= 1e-4)', async () => {
    const ids = model.encode(model.chat.render(messages, true));
    const out = await decoder.session.run({
      input_ids: new ort.Tensor('int64', BigInt64Array.from(ids, BigInt), [1, ids.length]),
      attention_mask: new ort.Tensor('int64', new BigInt64Array(ids.length).fill(1n), [1, ids.length]),
      position_ids: new ort.Tensor('int64', BigInt64Array.from(ids.map((_, i) => BigInt(i))), [1, ids.length]),
      ...decoder.emptyPast(),
    });
    const ref = llamaForward(checkpoint, ids);
    const errors = [0, 1, 2, 3].map((l) => relativeError(out[NAMES.hiddenState(l)].data as Float32Array, ref.hidden[l]));
    errors.push(relativeError(out.logits.data as Float32Array, ref.logits));
    if (process.env.AXIS_PRINT_ERRORS) process.stdout.write(`relative errors (hidden_states.0..3, logits): ${errors.map((e) => e.toExponential(2)).join(' ')}\n`);
    for (const e of errors) expect(e).toBeLessThanOrEqual(1e-4);
    // Not vacuous: the reference itself moves when the weights do.
    expect(relativeError(ref.hidden[3], llamaForward(checkpoint, ids.slice().reverse()).hidden[3])).toBeGreaterThan(1e-2);
  });

  it('the KV cache gives the same hidden states as one pass', async () => {
    const ids = model.encode('The keeper climbs the stairs at dusk.');
    const whole = await decoder.step(ids, 0, decoder.emptyPast());
    const first = await decoder.step(ids.slice(0, 5), 0, decoder.emptyPast());
    const rest = await decoder.step(ids.slice(5), 5, first.present);
    const d = model.metadata.hidden_size;
    for (let l = 0; l < 4; l++) expect(relativeError(rest.hidden[l], whole.hidden[l].subarray(5 * d))).toBeLessThanOrEqual(1e-5);
  });
});

describe('generation', () => {
  it('accumulates during generation the mean a single forward pass gives over the same positions (<= 1e-4)', async () => {
    const r = await generateOne(model, { messages, sampling, seed: 42, layers: [] });
    expect(r.finishReason).toBe('length');
    expect(r.completionTokens).toBe(12);
    const ref = referenceMean([...r.promptIds, ...r.responseIds], r.promptIds.length);
    const d = model.metadata.hidden_size;
    for (let l = 0; l < 4; l++) expect(relativeError(r.activation.data.subarray(l * d, (l + 1) * d), ref[l])).toBeLessThanOrEqual(1e-4);
    // Extract (one prefill over the same tokens) agrees too.
    const ex = await extractOne(model, [...messages, { role: 'assistant', content: r.text }], [], { answerIds: r.responseIds });
    expect(relativeError(ex.activation.data, r.activation.data)).toBeLessThanOrEqual(1e-4);
  });

  it('stops at a stop token from generation_config.json, which is neither fed nor counted', async () => {
    const greedy = { ...sampling, temperature: 0, maxNewTokens: 10 };
    const free = await generateOne(model, { messages, sampling: greedy, seed: 1, layers: [] });
    const at = free.responseIds.findIndex((id, i) => i >= 3 && free.responseIds.indexOf(id) === i);
    const stopId = free.responseIds[at];
    const dir = variant(modelDir, 'model-stop', (f, json) => (f === 'generation_config.json' ? { ...json, eos_token_id: [stopId] } : undefined));
    const stopping = await LoadedModel.load(dir);
    const r = await generateOne(stopping, { messages, sampling: greedy, seed: 1, layers: [] });
    expect(r.finishReason).toBe('stop');
    expect(r.responseIds).toEqual(free.responseIds.slice(0, at));
    const ref = referenceMean([...r.promptIds, ...r.responseIds], r.promptIds.length);
    const d = model.metadata.hidden_size;
    for (let l = 0; l < 4; l++) expect(relativeError(r.activation.data.subarray(l * d, (l + 1) * d), ref[l])).toBeLessThanOrEqual(1e-4);
    await stopping.close();
  });

  it('gives the same text for the same seed, another for another seed', async () => {
    const a = await generateOne(model, { messages, sampling, seed: 5, layers: [] });
    const b = await generateOne(model, { messages, sampling, seed: 5, layers: [] });
    const c = await generateOne(model, { messages, sampling, seed: 6, layers: [] });
    expect(b.text).toBe(a.text);
    expect(c.responseIds).not.toEqual(a.responseIds);
  });

  it('refuses a conversation longer than the context, naming it', async () => {
    await expect(generateOne(model, { messages, sampling: { ...sampling, maxContext: 20 }, seed: 1, layers: [] })).rejects.toThrow(/messages: the conversation is \d+ tokens, which leaves no room for an answer under max_context 20/);
  });
});

describe('chat templates', () => {
  it('renders a system message with the llama template', async () => {
    const backend = new OnnxBackend({ ...backendOptions, modelDirs: [modelDir] });
    await backend.load();
    expect(backend.info.supportsSystemPrompt).toBe(true);
    expect(backend.info.model).toBe('tiny-llama');
    expect(backend.info.modelShortName).toBe('Llama');
    await backend.close();
  });

  it('detects a template that rejects a system message, and the folded conversation generates', async () => {
    const noSystem =
      "{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}" +
      "{%- for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{%- endfor %}" +
      "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}";
    const dir = variant(modelDir, 'model-nosystem', (f, json) => (f === 'tokenizer_config.json' ? { ...json, chat_template: noSystem } : undefined));
    const backend = new OnnxBackend({ ...backendOptions, modelDirs: [dir] });
    await backend.load();
    expect(backend.info.supportsSystemPrompt).toBe(false);
    await expect(backend.generate({ messages, sampling, seed: 1, layers: [] })).rejects.toThrow(/System role not supported/);
    const folded = [{ role: 'user', content: `${messages[0].content}\n\n${messages[1].content}` }];
    const r = await backend.generate({ messages: folded, sampling, seed: 1, layers: [] });
    expect(r.completionTokens).toBeGreaterThan(0);
    await backend.close();
  });
});

describe('bad model directories get a clear error', () => {
  it.each([['loop', 'generate.onnx'], ['host', 'model.onnx']] as const)('no graph (%s: %s)', async (decode, file) => {
    const dir = variant(modelDir, `model-nograph-${decode}`, () => undefined);
    fs.rmSync(path.join(dir, 'onnx', file));
    await expect(LoadedModel.load(dir, { decode })).rejects.toThrow(new RegExp(`${file.replace('.', '\\.')}: the model directory has no ONNX graph`));
  });

  it('no metadata', async () => {
    const dir = variant(modelDir, 'model-nometa', () => undefined);
    fs.rmSync(path.join(dir, 'axis_model.json'));
    await expect(LoadedModel.load(dir)).rejects.toThrow(/axis_model\.json: missing/);
  });

  it('a graph whose outputs do not match the metadata', async () => {
    const dir = variant(modelDir, 'model-mismatch', (f, json) => (f === 'axis_model.json' ? { ...json, outputs: json.outputs.filter((o: string) => o !== 'hidden_states.2'), hidden_state_outputs: ['hidden_states.0'] } : undefined));
    await expect(LoadedModel.load(dir, { decode: 'host' })).rejects.toThrow(/does not match axis_model\.json: graph output hidden_states\.2 not in the metadata/);
  });

  it('a model built without hidden-state outputs', async () => {
    const { modelDir: plain } = await tinyLlama({ capture: false });
    await expect(LoadedModel.load(plain, { decode: 'host' })).rejects.toThrow(/0 hidden-state outputs for 4 layers/);
    await expect(LoadedModel.load(plain, { decode: 'loop' })).rejects.toThrow(/generation graph was built without capture/);
  });

  it.each([['loop', 'generate.onnx'], ['host', 'model.onnx']] as const)('a graph changed after it was built (%s: %s)', async (decode, file) => {
    const dir = variant(modelDir, `model-changed-${decode}`, () => undefined);
    fs.appendFileSync(path.join(dir, 'onnx', file), Buffer.from([0]));
    await expect(LoadedModel.load(dir, { decode })).rejects.toThrow(/differs from axis_model\.json/);
  });
});
