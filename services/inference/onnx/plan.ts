import { promises as fs } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ModelPlan, parseBytes, planDevice } from '../memoryPlan';
import type { LoadedModel } from './model';
import { readMetadata } from './session';

/**
 * The memory plan of a loaded model, one device per stage, from the weights as built (each
 * stage's data file) and the metadata. Today's runner (the portable and generation graphs)
 * computes in float32: half-precision weights are widened when onnxruntime loads them, and
 * its KV cache is float32, so the plan counts float32 bytes. `deviceMemory` empty: the
 * machine's RAM on the CPU; on CUDA, no plan (undefined).
 */
export async function planLoaded(modelDirs: string[], model: LoadedModel, slotLength: number, deviceMemory: string): Promise<ModelPlan | undefined> {
  const onCuda = model.runner.placements.some((p) => p.provider === 'cuda');
  if (!deviceMemory && onCuda) return undefined;
  const memory = deviceMemory ? parseBytes(deviceMemory, '--device-memory') : os.totalmem();
  if (!(Number.isInteger(slotLength) && slotLength >= 1)) throw new Error(`--slot-length must be a positive integer, got ${slotLength}`);
  const m = model.metadata;
  const dims = { numLayers: m.num_layers, hidden: m.hidden_size, intermediate: 4 * m.hidden_size, heads: m.num_attention_heads, kvHeads: m.num_key_value_heads, headDim: m.head_dim, vocab: m.vocab_size };
  const widen = m.dtype === 'f32' ? 1 : 2;
  const devices = [];
  for (const dir of modelDirs) {
    const stage = await readMetadata(dir);
    const layers = stage.layers ?? [0, m.num_layers];
    const fileBytes = (await fs.stat(path.join(dir, stage.weights))).size;
    devices.push({ layers, ...planDevice({ dims, layersHere: layers[1] - layers[0], weightBytes: fileBytes * widen, computeBytes: 4, deviceMemory: memory, slotLength, head: layers[1] === m.num_layers }) });
  }
  const slots = Math.min(...devices.map((d) => d.slots));
  return { gpus: devices.length, devices, slots, fits: slots >= 1 };
}
