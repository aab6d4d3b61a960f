import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DecoderSession } from '../../services/inference/onnx/session';
import { StepSession } from '../../services/inference/onnx/stepSession';
import { buildModel } from '../../services/model/build';
import { TINY_ARCHITECTURES, writeTinyCheckpoint } from '../../services/model/tiny';
import { readSafetensors } from '../../services/shared/safetensors';
import { relativeError } from '../reference/forward';
import { ROOT } from '../kit/stack';
import { tempDir } from '../kit/files';

/**
 * The outside check of the graphs: hidden states and logits from Hugging Face transformers' own
 * forward pass (5.17, float64, forward hooks on model.layers[l]) on the same tiny checkpoints,
 * made on a GPU machine by test/golden/make_golden.py and committed with it.
 */
const GOLDEN = path.join(ROOT, 'test', 'golden');
const golden = JSON.parse(fs.readFileSync(path.join(GOLDEN, 'golden.json'), 'utf8')) as Record<string, { checkpoint_sha256: string; ids: number[]; transformers: string }>;
const root = tempDir('golden');

describe.each(TINY_ARCHITECTURES.map((a) => [a]))('%s against transformers', (arch) => {
  it('hidden states and logits of the portable graph and of the step graph equal transformers\' (<= 1e-4 per tensor)', async () => {
    const want = golden[arch];
    const ckpt = path.join(root, `ckpt-${arch}`);
    await writeTinyCheckpoint({ arch, out: ckpt, seed: 3, merges: 2000 });
    const sha = createHash('sha256').update(fs.readFileSync(path.join(ckpt, 'model.safetensors'))).digest('hex');
    // A changed generator makes other weights: the golden files must be made again, not the graph blamed.
    expect({ arch, sha }).toEqual({ arch, sha: want.checkpoint_sha256 });
    const modelDir = path.join(root, `model-${arch}`);
    await buildModel({ hf: ckpt, out: modelDir, capture: true });
    const ref = await readSafetensors(path.join(GOLDEN, `${arch}.safetensors`));
    const decoder = await DecoderSession.load(modelDir);
    const step = await StepSession.load(modelDir, { slots: 1, slotLength: want.ids.length });
    try {
      const { num_layers: L, hidden_size: d } = decoder.metadata;
      const n = want.ids.length;
      expect(ref.tensors.hidden_states.shape).toEqual([L, n, d]);
      const portable = await decoder.forward(want.ids);
      const stepped = await step.prefill(0, want.ids, { logits: 'all' });
      for (const { hidden, logits } of [{ hidden: portable.hidden, logits: portable.allLogits }, stepped]) {
        for (let l = 0; l < L; l++) {
          expect(relativeError(hidden[l], ref.tensors.hidden_states.data.subarray(l * n * d, (l + 1) * n * d))).toBeLessThanOrEqual(1e-4);
        }
        expect(relativeError(logits, ref.tensors.logits.data)).toBeLessThanOrEqual(1e-4);
      }
    } finally {
      await decoder.close();
      await step.close();
    }
  });
});
