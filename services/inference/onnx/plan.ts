import { promises as fs } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ModelPlan, parseBytes, planDevice } from '../memoryPlan';
import { Placement, readMetadata } from './session';

const BYTES = { f32: 4, f16: 2, bf16: 2 } as const;

/**
 * The memory plan of a model directory (or the stages of a split one), one device per stage,
 * from the weights as built (each stage's data file) and the metadata. `engine`: `slots` runs
 * the step graph, which computes in the build's precision with the weights as stored;
 * `portable` (the generation graph, the host loop) computes in float32: half-precision
 * weights are widened when onnxruntime loads them, and the KV cache is float32.
 * `deviceMemory` empty: the machine's RAM on the CPU; on CUDA, no plan (undefined).
 */
export async function planModelDirs(modelDirs: string[], placements: Placement[], opts: { slotLength: number; deviceMemory: string; engine: 'slots' | 'portable' }): Promise<ModelPlan | undefined> {
  if (!opts.deviceMemory && placements.some((p) => p.provider === 'cuda')) return undefined;
  const memory = opts.deviceMemory ? parseBytes(opts.deviceMemory, '--device-memory') : os.totalmem();
  if (!(Number.isInteger(opts.slotLength) && opts.slotLength >= 1)) throw new Error(`--slot-length must be a positive integer, got ${opts.slotLength}`);
  const devices = [];
  for (const dir of modelDirs) {
    const m = await readMetadata(dir);
    const dims = { numLayers: m.num_layers, hidden: m.hidden_size, intermediate: 4 * m.hidden_size, heads: m.num_attention_heads, kvHeads: m.num_key_value_heads, headDim: m.head_dim, vocab: m.vocab_size };
    const layers = m.layers ?? [0, m.num_layers];
    const fileBytes = (await fs.stat(path.join(dir, m.weights))).size;
    const slots = opts.engine === 'slots';
    const computeBytes = slots ? BYTES[m.step?.compute_dtype ?? 'f32'] : 4;
    const weightBytes = slots || m.dtype === 'f32' ? fileBytes : fileBytes * 2;
    devices.push({ layers, ...planDevice({ dims, layersHere: layers[1] - layers[0], weightBytes, computeBytes, deviceMemory: memory, slotLength: opts.slotLength, head: layers[1] === m.num_layers }) });
  }
  const slots = Math.min(...devices.map((d) => d.slots));
  return { gpus: devices.length, devices, slots, fits: slots >= 1 };
}
