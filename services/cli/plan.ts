import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { DEFAULT_SLOT_LENGTH, describePlan, formatGiB, gpusNeeded, parseBytes, PlanConfig, planModel, PlanError } from '../inference/memoryPlan';

const COMPUTE_BYTES: Record<string, number> = { bf16: 2, f16: 2, f32: 4 };

/** `axis-model plan`: the memory plan from a config.json, printed; resolves to whether the model fits. */
export async function printPlan(opts: { hf: string; dtype: string; gpuMemory: string; maxLength?: string; gpus: string }, print: (line: string) => void): Promise<boolean> {
  const computeBytes = COMPUTE_BYTES[opts.dtype];
  if (!computeBytes) throw new PlanError(`--dtype must be bf16, f16 or f32, got ${JSON.stringify(opts.dtype)}`);
  const file = opts.hf.endsWith('.json') ? opts.hf : path.join(opts.hf, 'config.json');
  let config: PlanConfig;
  try {
    config = JSON.parse(await fs.readFile(file, 'utf8')) as PlanConfig;
  } catch (err) {
    throw new PlanError(`--hf: cannot read ${file}: ${(err as Error).message}`);
  }
  const deviceMemory = parseBytes(opts.gpuMemory, '--gpu-memory');
  const slotLength = opts.maxLength === undefined ? DEFAULT_SLOT_LENGTH : Number(opts.maxLength);
  const gpus = Number(opts.gpus);
  const plan = planModel(config, { computeBytes, deviceMemory, slotLength, gpus });
  print(`${config.model_type}, ${config.num_hidden_layers} layers, ${opts.dtype}, on ${gpus} GPU${gpus === 1 ? '' : 's'} of ${formatGiB(deviceMemory)} (${(deviceMemory / 1e9).toFixed(1)} GB)`);
  for (const line of describePlan(plan)) print(line);
  if (!plan.fits) {
    const needed = gpusNeeded(config, { computeBytes, deviceMemory, slotLength });
    print(
      needed
        ? `a split into stages needs ${needed} GPUs of ${formatGiB(deviceMemory)}: axis-model plan ... --gpus ${needed}; build the stages with axis-model build --layers`
        : `even one layer per GPU does not fit ${formatGiB(deviceMemory)} with ${slotLength}-token slots`,
    );
  }
  return plan.fits;
}
