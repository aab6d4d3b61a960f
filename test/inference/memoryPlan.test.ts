import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { parseBytes, PlanConfig, planModel } from '../../services/inference/memoryPlan';
import { tempDir } from '../kit/files';
import { ROOT } from '../kit/stack';

/**
 * The memory plan against numbers worked out here from the published architectures: Gemma 2
 * 27B, Qwen 3 32B and Llama 3.3 70B in bf16 on 80 GiB and 141 GiB devices, and what
 * `axis-model plan` prints and exits with.
 */
const GiB = 2 ** 30;
const MODELS: Record<string, { config: PlanConfig; params: number; normParams: number }> = {
  // Parameter counts as published (model cards / safetensors index); norm weights are stored in float32.
  'gemma-2-27b': {
    config: { model_type: 'gemma2', hidden_size: 4608, intermediate_size: 36864, num_hidden_layers: 46, num_attention_heads: 32, num_key_value_heads: 16, head_dim: 128, vocab_size: 256000, tie_word_embeddings: true },
    params: 27_227_128_320,
    normParams: 46 * 4 * 4608 + 4608,
  },
  'qwen3-32b': {
    config: { model_type: 'qwen3', hidden_size: 5120, intermediate_size: 25600, num_hidden_layers: 64, num_attention_heads: 64, num_key_value_heads: 8, head_dim: 128, vocab_size: 151936, tie_word_embeddings: false },
    params: 32_762_123_264,
    normParams: 64 * (2 * 5120 + 2 * 128) + 5120,
  },
  'llama-3.3-70b': {
    config: { model_type: 'llama', hidden_size: 8192, intermediate_size: 28672, num_hidden_layers: 80, num_attention_heads: 64, num_key_value_heads: 8, head_dim: 128, vocab_size: 128256, tie_word_embeddings: false },
    params: 70_553_706_496,
    normParams: 80 * 2 * 8192 + 8192,
  },
};

/** The plan worked out by hand for one device holding the whole model in bf16 with 2560-token slots. */
function byHand(name: string, memory: number) {
  const { config: c, params, normParams } = MODELS[name];
  const weights = 2 * (params - normParams) + 4 * normParams;
  const kvPerToken = 2 * c.num_hidden_layers * c.num_key_value_heads! * c.head_dim! * 2;
  // Its KV rows, float32 logits and per-layer outputs and sums, and its row of a decoding step: one
  // token's bf16 activations, its float32 scores against 2560 keys, the draw's scratch (32 bytes per id).
  const tokenActivations = (4 * c.hidden_size + (c.num_attention_heads + 2 * c.num_key_value_heads!) * c.head_dim! + 3 * c.intermediate_size) * 2;
  const perSlot = 2560 * kvPerToken + c.vocab_size * 4 + 2 * c.num_hidden_layers * c.hidden_size * 4 + tokenActivations + c.num_attention_heads * 2560 * 4 + c.vocab_size * 32;
  // 1 GiB reserve; a 512-token chunk's activations (bf16), its float32 scores against 2560 keys, its float32 logits.
  const working = GiB + 512 * (4 * c.hidden_size + (c.num_attention_heads + 2 * c.num_key_value_heads!) * c.head_dim! + 3 * c.intermediate_size) * 2 + c.num_attention_heads * 512 * 2560 * 4 + 512 * c.vocab_size * 4;
  return { weights, kvPerToken, perSlot, working, slots: Math.max(0, Math.floor((memory - weights - working) / perSlot)) };
}

describe('the memory plan', () => {
  it.each([
    ['gemma-2-27b', 80, true],
    ['gemma-2-27b', 141, true],
    ['qwen3-32b', 80, true],
    ['qwen3-32b', 141, true],
    ['llama-3.3-70b', 80, false],
    ['llama-3.3-70b', 141, true],
  ] as const)('%s in bf16 on %i GiB: fits %s, with the slots worked out by hand', (name, gib, fits) => {
    const plan = planModel(MODELS[name].config, { computeBytes: 2, deviceMemory: gib * GiB, slotLength: 2560, gpus: 1 });
    const want = byHand(name, gib * GiB);
    const p = plan.devices[0];
    expect({ weights: p.weightBytes, kv: p.kvBytesPerToken, slot: p.bytesPerSlot, working: p.workingBytes, slots: p.slots }).toEqual({ weights: want.weights, kv: want.kvPerToken, slot: want.perSlot, working: want.working, slots: Math.min(256, want.slots) });
    expect(plan.fits).toBe(fits);
  });

  it('agrees with the sizes people quote: Gemma 2 27B in bf16 is about 54.5 GB, Llama 3.3 70B about 141 GB', () => {
    const gemma = planModel(MODELS['gemma-2-27b'].config, { computeBytes: 2, deviceMemory: 80 * GiB, slotLength: 2560, gpus: 1 });
    const llama = planModel(MODELS['llama-3.3-70b'].config, { computeBytes: 2, deviceMemory: 80 * GiB, slotLength: 2560, gpus: 1 });
    expect(gemma.devices[0].weightBytes / 1e9).toBeCloseTo(54.46, 1);
    expect(llama.devices[0].weightBytes / 1e9).toBeCloseTo(141.1, 0);
  });

  it('splits Llama 3.3 70B over two 80 GiB GPUs: each stage holds half the layers, the embeddings on the first, the head on the last', () => {
    const plan = planModel(MODELS['llama-3.3-70b'].config, { computeBytes: 2, deviceMemory: 80 * GiB, slotLength: 2560, gpus: 2 });
    expect(plan.devices.map((d) => d.layers)).toEqual([[0, 40], [40, 80]]);
    const table = 128256 * 8192 * 2;
    const layer = (8192 * (64 + 16) * 128 + 64 * 128 * 8192 + 3 * 8192 * 28672) * 2 + 2 * 8192 * 4;
    expect(plan.devices.map((d) => d.weightBytes)).toEqual([40 * layer + table, 40 * layer + 8192 * 4 + table]);
    expect(plan.fits).toBe(true);
  });

  it('reads sizes in GiB and GB, and names the flag of one it cannot read', () => {
    expect(parseBytes('80GiB', '--gpu-memory')).toBe(80 * GiB);
    expect(parseBytes('141GB', '--gpu-memory')).toBe(141e9);
    expect(parseBytes('1.5 TiB', '--gpu-memory')).toBe(1.5 * 2 ** 40);
    expect(() => parseBytes('eighty', '--gpu-memory')).toThrow('--gpu-memory: "eighty" is not a size');
    expect(() => parseBytes('0GB', '--gpu-memory')).toThrow('--gpu-memory: must be more than 0 bytes');
  });

  it('names the field of a config it cannot plan', () => {
    expect(() => planModel({ ...MODELS['qwen3-32b'].config, model_type: 'mamba' }, { computeBytes: 2, deviceMemory: 80 * GiB, slotLength: 2560, gpus: 1 })).toThrow('config.json: model_type "mamba" is not supported');
    expect(() => planModel({ ...MODELS['qwen3-32b'].config, hidden_size: 0 }, { computeBytes: 2, deviceMemory: 80 * GiB, slotLength: 2560, gpus: 1 })).toThrow('config.json: "hidden_size" must be a positive integer');
  });
});

describe('axis-model plan', () => {
  const run = (args: string[]) =>
    promisify(execFile)('node', [path.join(ROOT, 'dist', 'services', 'cli', 'axisModel.js'), 'plan', ...args]).then(
      (r) => ({ code: 0, out: r.stdout + r.stderr }),
      (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, out: e.stdout + e.stderr }),
    );
  const dir = tempDir('plan');
  const file = (name: string) => {
    const f = path.join(dir, `${name}.json`);
    fs.writeFileSync(f, JSON.stringify(MODELS[name].config));
    return f;
  };

  it('prints a plan that fits and exits 0; one that does not exits 1 and says how many GPUs a split needs', async () => {
    const gemma = await run(['--hf', file('gemma-2-27b'), '--dtype', 'bf16', '--gpu-memory', '80GiB']);
    expect(gemma.code).toBe(0);
    expect(gemma.out).toContain(`${byHand('gemma-2-27b', 80 * GiB).slots} slots`);
    expect(gemma.out).toMatch(/weights 50\.72 GiB/);
    const llama = await run(['--hf', file('llama-3.3-70b'), '--dtype', 'bf16', '--gpu-memory', '80GiB']);
    expect(llama.code).toBe(1);
    expect(llama.out).toMatch(/does not fit/);
    expect(llama.out).toMatch(/a split into stages needs 2 GPUs of 80\.00 GiB/);
    const split = await run(['--hf', file('llama-3.3-70b'), '--dtype', 'bf16', '--gpu-memory', '80GiB', '--gpus', '2']);
    expect(split.code).toBe(0);
  });

  it('refuses bad input with the flag named', async () => {
    expect(await run(['--hf', file('gemma-2-27b'), '--dtype', 'int4', '--gpu-memory', '80GiB'])).toMatchObject({ code: 1, out: expect.stringContaining('--dtype must be bf16, f16 or f32') });
    expect(await run(['--hf', path.join(dir, 'nope.json'), '--dtype', 'bf16', '--gpu-memory', '80GiB'])).toMatchObject({ code: 1, out: expect.stringContaining('--hf: cannot read') });
    expect(await run(['--hf', file('gemma-2-27b'), '--dtype', 'bf16'])).toMatchObject({ code: 1, out: expect.stringContaining('plan needs --hf, --dtype and --gpu-memory') });
  });
});
