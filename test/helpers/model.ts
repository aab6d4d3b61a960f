import * as fs from 'node:fs';
import * as path from 'node:path';
import { buildModel } from '../../services/model/build';
import { writeTinyCheckpoint } from '../../services/model/tiny';
import { tempDir } from '../kit/files';

/** A tiny random-weight llama checkpoint and its ONNX build, in a temporary directory. */
export async function tinyLlama(opts: { capture?: boolean; seed?: number } = {}): Promise<{ checkpoint: string; modelDir: string; dir: string }> {
  const dir = tempDir('model');
  const checkpoint = path.join(dir, 'checkpoint');
  const modelDir = path.join(dir, 'model');
  await writeTinyCheckpoint({ arch: 'llama', out: checkpoint, seed: opts.seed ?? 1, merges: 2000 });
  await buildModel({ hf: checkpoint, out: modelDir, capture: opts.capture ?? true });
  return { checkpoint, modelDir, dir };
}

/** A copy of a model directory with some JSON files changed. */
export function variant(modelDir: string, name: string, edit: (file: string, json: any) => any): string {
  const out = path.join(path.dirname(modelDir), name);
  fs.cpSync(modelDir, out, { recursive: true });
  for (const f of ['tokenizer_config.json', 'generation_config.json', 'axis_model.json']) {
    const file = path.join(out, f);
    const edited = edit(f, JSON.parse(fs.readFileSync(file, 'utf8')));
    if (edited !== undefined) fs.writeFileSync(file, JSON.stringify(edited, null, 2));
  }
  return out;
}
