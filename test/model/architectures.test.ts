import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import * as ort from 'onnxruntime-node';
import { generateOne } from '../../services/inference/onnx/generate';
import { LoadedModel } from '../../services/inference/onnx/model';
import { DecoderSession } from '../../services/inference/onnx/session';
import { buildModel } from '../../services/model/build';
import { writeTinyCheckpoint, TINY_ARCHITECTURES, TinyArch } from '../../services/model/tiny';
import { decodeSafetensors, encodeSafetensors, readSafetensors, SafetensorsDtype } from '../../services/shared/safetensors';
import type { FloatTensor } from '../../services/shared/tensor';
import { referenceForward, relativeError } from '../reference/forward';
import { ROOT } from '../kit/stack';
import { tempDir } from '../kit/files';

// 12 tokens: longer than Gemma 2's 4-token sliding window.
const IDS = [5, 300, 17, 901, 44, 1500, 2, 77, 640, 1200, 9, 333];
const root = tempDir('arch');

async function tiny(arch: TinyArch): Promise<string> {
  const dir = path.join(root, `ckpt-${arch}`);
  if (!fs.existsSync(dir)) await writeTinyCheckpoint({ arch, out: dir, seed: 3, merges: 2000 });
  return dir;
}

let built = 0;
async function build(checkpoint: string, opts: { dtype?: 'f32' | 'f16' | 'bf16'; layers?: [number, number]; capture?: boolean } = {}): Promise<string> {
  const out = path.join(root, `model-${built++}`);
  await buildModel({ hf: checkpoint, out, capture: opts.capture ?? true, dtype: opts.dtype, layers: opts.layers });
  return out;
}

async function forward(modelDir: string, ids = IDS): Promise<{ hidden: Float32Array[]; logits: Float32Array }> {
  const decoder = await DecoderSession.load(modelDir);
  try {
    const { hidden, allLogits } = await decoder.forward(ids);
    return { hidden: hidden.map((h) => h.slice()), logits: allLogits.slice() };
  } finally {
    await decoder.close();
  }
}

/** A copy of a checkpoint with its config changed and/or its tensors rewritten. */
function variant(checkpoint: string, name: string, opts: { config?: Record<string, unknown>; tensors?: (t: Record<string, FloatTensor>) => void; dtype?: SafetensorsDtype } = {}): string {
  const out = path.join(root, name);
  fs.cpSync(checkpoint, out, { recursive: true });
  if (opts.config) {
    const config = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8'));
    fs.writeFileSync(path.join(out, 'config.json'), JSON.stringify({ ...config, ...opts.config }));
  }
  if (opts.tensors || opts.dtype) {
    const file = path.join(out, 'model.safetensors');
    const { tensors } = decodeSafetensors(fs.readFileSync(file));
    opts.tensors?.(tensors);
    fs.writeFileSync(file, encodeSafetensors(tensors, {}, opts.dtype ?? 'F32'));
  }
  return out;
}

function expectMatchesReference(got: { hidden: Float32Array[]; logits: Float32Array }, ref: { hidden: Float64Array[]; logits: Float64Array }): void {
  ref.hidden.forEach((h, l) => expect(relativeError(got.hidden[l], h)).toBeLessThanOrEqual(1e-4));
  expect(relativeError(got.logits, ref.logits)).toBeLessThanOrEqual(1e-4);
}

/** For each architecture: the features a config (or zeroed weights) can switch off, to show each one acts. */
const FEATURES: Record<TinyArch, { feature: string; config?: Record<string, unknown>; zero?: RegExp }[]> = {
  llama: [{ feature: 'llama3 rope scaling', config: { rope_scaling: null } }],
  qwen2: [{ feature: 'q/k/v biases', zero: /_proj\.bias$/ }],
  qwen3: [{ feature: 'per-head q/k RMSNorm', config: { model_type: 'llama' } }],
  gemma2: [
    { feature: 'sliding window', config: { sliding_window: null } },
    { feature: 'attention soft-capping', config: { attn_logit_softcapping: null } },
    { feature: 'final logit soft-capping', config: { final_logit_softcapping: null } },
    { feature: 'query_pre_attn_scalar', config: { query_pre_attn_scalar: 16 } },
  ],
};

describe.each(TINY_ARCHITECTURES.map((a) => [a]))('%s', (arch) => {
  it('hidden states and logits match the float64 reference (<= 1e-4 per tensor)', async () => {
    const ckpt = await tiny(arch);
    expectMatchesReference(await forward(await build(ckpt)), referenceForward(ckpt, IDS));
  });

  it.each(FEATURES[arch].map((f) => [f.feature, f]))('%s acts: turning it off changes the result, and both match the reference', async (_name, f) => {
    const ckpt = await tiny(arch);
    const off = variant(ckpt, `${arch}-no-${f.feature.replace(/\W+/g, '-')}`, {
      config: f.config,
      tensors: f.zero ? (t) => Object.entries(t).forEach(([n, v]) => f.zero!.test(n) && v.data.fill(0)) : undefined,
    });
    const on = await forward(await build(ckpt));
    const without = await forward(await build(off));
    const changed = Math.max(relativeError(without.logits, on.logits), ...on.hidden.map((h, l) => relativeError(without.hidden[l], h)));
    expect(changed).toBeGreaterThan(1e-3);
    expectMatchesReference(without, referenceForward(off, IDS));
  });

  it('generates with its tokenizer and chat template', async () => {
    const model = await LoadedModel.load(await build(await tiny(arch)));
    const system = model.chat.supportsSystemPrompt();
    expect(system).toBe(arch !== 'gemma2');
    const messages = system
      ? [{ role: 'system', content: 'You are a gardener.' }, { role: 'user', content: 'What grows in spring?' }]
      : [{ role: 'user', content: 'You are a gardener.\n\nWhat grows in spring?' }];
    const r = await generateOne(model, { messages, sampling: { temperature: 0.7, topP: 0.9, maxNewTokens: 8, maxContext: 2048, seed: 0, enableThinking: false }, seed: 1, layers: [] });
    expect(r.completionTokens).toBeGreaterThan(0);
    if (arch === 'qwen3') expect(model.chat.render(messages, true)).toMatch(/<think>\n\n<\/think>\n\n$/);
    await model.close();
  });
});

describe('checkpoint formats and build options', () => {
  it('reads BF16 and F16 checkpoints exactly (the reference reads the same rounded weights)', async () => {
    const ckpt = await tiny('llama');
    for (const dtype of ['BF16', 'F16'] as const) {
      const half = variant(ckpt, `llama-${dtype}`, { dtype });
      expectMatchesReference(await forward(await build(half)), referenceForward(half, IDS));
    }
  });

  it('reads a sharded checkpoint (model.safetensors.index.json) to the same graph', async () => {
    const ckpt = await tiny('qwen3');
    const sharded = path.join(root, 'qwen3-sharded');
    fs.cpSync(ckpt, sharded, { recursive: true });
    const { tensors } = decodeSafetensors(fs.readFileSync(path.join(ckpt, 'model.safetensors')));
    fs.rmSync(path.join(sharded, 'model.safetensors'));
    const names = Object.keys(tensors);
    const shards = [names.slice(0, names.length / 2), names.slice(names.length / 2)];
    const weightMap: Record<string, string> = {};
    shards.forEach((part, i) => {
      const file = `model-0000${i + 1}-of-00002.safetensors`;
      fs.writeFileSync(path.join(sharded, file), encodeSafetensors(Object.fromEntries(part.map((n) => [n, tensors[n]]))));
      for (const n of part) weightMap[n] = file;
    });
    fs.writeFileSync(path.join(sharded, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: weightMap }));
    const a = await forward(await build(ckpt));
    const b = await forward(await build(sharded));
    expect(b.logits).toEqual(a.logits);
    b.hidden.forEach((h, l) => expect(h).toEqual(a.hidden[l]));
  });

  it('stores f16 and bf16 weights at half the size; the portable graph keeps float32 inputs, outputs and arithmetic', async () => {
    // Llama: Gemma 2 is refused in f16 (test/model/stepGraph.test.ts).
    const ckpt = await tiny('llama');
    const f32 = await build(ckpt);
    const full = await forward(f32);
    for (const dtype of ['f16', 'bf16'] as const) {
      const dir = await build(ckpt, { dtype });
      const size = (d: string) => fs.statSync(path.join(d, 'onnx', 'model.onnx_data')).size;
      expect(size(dir)).toBeLessThan(size(f32) * 0.55);
      const meta = JSON.parse(fs.readFileSync(path.join(dir, 'axis_model.json'), 'utf8'));
      expect(meta.dtype).toBe(dtype);
      const out = await forward(dir);
      // Rounding the weights moves the result a little, not a lot.
      expect(relativeError(out.logits, full.logits)).toBeLessThan(dtype === 'f16' ? 5e-3 : 5e-2);
    }
  });

  it('a model split into stages (--layers) gives the same hidden states as the whole graph', async () => {
    const ckpt = await tiny('gemma2');
    const whole = await forward(await build(ckpt));
    const first = await build(ckpt, { layers: [0, 2] });
    const second = await build(ckpt, { layers: [2, 4] });
    const meta = JSON.parse(fs.readFileSync(path.join(second, 'axis_model.json'), 'utf8'));
    expect(meta.layers).toEqual([2, 4]);
    expect(meta.inputs[0]).toBe('hidden_states.1');
    const run = async (dir: string, feeds: Record<string, ort.Tensor>) => {
      const s = await ort.InferenceSession.create(path.join(dir, 'onnx', 'model.onnx'));
      const out = await s.run(feeds);
      await s.release();
      return out;
    };
    const common = (layers: number[]) => {
      const f: Record<string, ort.Tensor> = {
        attention_mask: new ort.Tensor('int64', new BigInt64Array(IDS.length).fill(1n), [1, IDS.length]),
        position_ids: new ort.Tensor('int64', BigInt64Array.from(IDS.map((_, i) => BigInt(i))), [1, IDS.length]),
      };
      for (const l of layers) {
        f[`past_key_values.${l}.key`] = new ort.Tensor('float32', new Float32Array(0), [1, 2, 0, 16]);
        f[`past_key_values.${l}.value`] = new ort.Tensor('float32', new Float32Array(0), [1, 2, 0, 16]);
      }
      return f;
    };
    const a = await run(first, { ...common([0, 1]), input_ids: new ort.Tensor('int64', BigInt64Array.from(IDS, BigInt), [1, IDS.length]) });
    const b = await run(second, { ...common([2, 3]), 'hidden_states.1': a['hidden_states.1'] });
    [a['hidden_states.0'], a['hidden_states.1'], b['hidden_states.2'], b['hidden_states.3']].forEach((t, l) => expect(relativeError(t.data as Float32Array, whole.hidden[l])).toBeLessThanOrEqual(1e-6));
    expect(relativeError(b.logits.data as Float32Array, whole.logits)).toBeLessThanOrEqual(1e-6);
    expect(a.logits).toBeUndefined();
  });

  it('axis-model hidden writes hidden_states [layers, seq, hidden] and logits [seq, vocab]', async () => {
    const ckpt = await tiny('qwen2');
    const model = await build(ckpt);
    const out = path.join(root, 'hidden.safetensors');
    await promisify(execFile)(process.execPath, [path.join(ROOT, 'dist/services/cli/axisModel.js'), 'hidden', '--model', model, '--ids', IDS.join(','), '--out', out]);
    const { tensors } = await readSafetensors(out);
    expect(tensors.hidden_states.shape).toEqual([4, IDS.length, 64]);
    const ref = referenceForward(ckpt, IDS);
    for (let l = 0; l < 4; l++) expect(relativeError(tensors.hidden_states.data.subarray(l * IDS.length * 64, (l + 1) * IDS.length * 64), ref.hidden[l])).toBeLessThanOrEqual(1e-4);
    expect(tensors.logits.shape).toEqual([IDS.length, ref.logits.length / IDS.length]);
  });
});

describe('a bad checkpoint fails the build with a message naming the tensor, key or file, and leaves nothing behind', () => {
  const cases: [string, () => Promise<string>, RegExp][] = [
    ['unsupported model_type', async () => variant(await tiny('llama'), 'bad-type', { config: { model_type: 'mamba' } }), /model_type "mamba" is not supported/],
    ['missing key', async () => variant(await tiny('llama'), 'bad-key', { config: { num_attention_heads: undefined } }), /"num_attention_heads" is missing/],
    ['missing tensor', async () => variant(await tiny('llama'), 'bad-missing', { tensors: (t) => delete t['model.layers.2.mlp.up_proj.weight'] }), /tensor model\.layers\.2\.mlp\.up_proj\.weight is missing/],
    ['shape mismatch', async () => variant(await tiny('llama'), 'bad-shape', { config: { intermediate_size: 96 } }), /model\.layers\.0\.mlp\.gate_proj\.weight: shape \[128,64\] .* expected \[96,64\]/],
    [
      'unreadable safetensors header',
      async () => {
        const dir = variant(await tiny('llama'), 'bad-header');
        const file = path.join(dir, 'model.safetensors');
        const buf = fs.readFileSync(file);
        buf.write('!!!!', 8);
        fs.writeFileSync(file, buf);
        return dir;
      },
      /model\.safetensors: the safetensors header is not valid JSON/,
    ],
  ];
  it.each(cases)('%s', async (_what, make, message) => {
    const ckpt = await make();
    const out = path.join(root, `never-${path.basename(ckpt)}`);
    await expect(buildModel({ hf: ckpt, out, capture: true })).rejects.toThrow(message);
    expect(fs.readdirSync(root).filter((f) => f.startsWith(`never-${path.basename(ckpt)}`))).toEqual([]);
  });
});
