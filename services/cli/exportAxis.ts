import * as fs from 'node:fs';
import * as path from 'node:path';
import { writeFileAtomic } from '../shared/files';
import { encodeGguf } from '../shared/gguf';
import { readSafetensors } from '../shared/safetensors';

export const EXPORT_FORMATS = ['gguf-control-vector'] as const;
export type ExportFormat = (typeof EXPORT_FORMATS)[number];

/** A finished run's directory cannot be exported: the message names the file and what is wrong. */
export class ExportError extends Error {}

/**
 * A finished run's axis as a llama.cpp control vector: GGUF with `general.architecture =
 * controlvector`, `controlvector.model_hint` (the model's architecture), `controlvector.layer_count`
 * and one float32 tensor `direction.<i>` [hidden] per layer, `scale` times the axis's row for
 * layer i. Layer numbering: llama.cpp adds `direction.i` to the output of block i (0-based,
 * what this project's row i is) and has no `direction.0`, so block 0's row is left out. Rows of
 * a run that kept a subset of layers go to their own layer numbers. Returns the layers written.
 */
export async function exportControlVector(runDir: string, out: string, scale = 1): Promise<number[]> {
  const axisFile = path.join(runDir, 'axis.safetensors');
  if (!fs.existsSync(axisFile)) throw new ExportError(`${axisFile}: no such file: is ${runDir} a finished run's directory?`);
  const { tensors, metadata } = await readSafetensors(axisFile);
  const axis = tensors.axis;
  if (!axis || axis.shape.length !== 2) throw new ExportError(`${axisFile}: no [layers, hidden] tensor named axis`);
  const [rows, hidden] = axis.shape;
  const layers = !metadata.layers || metadata.layers === 'all' ? [...Array(rows).keys()] : metadata.layers.split(',').map(Number);
  if (layers.length !== rows || layers.some((l) => !Number.isInteger(l) || l < 0)) throw new ExportError(`${axisFile}: its layers metadata (${metadata.layers}) does not name its ${rows} rows`);
  if (!Number.isFinite(scale)) throw new ExportError(`--scale must be a number, got ${scale}`);
  let hint = 'unknown';
  try {
    hint = JSON.parse(fs.readFileSync(path.join(runDir, 'manifest.json'), 'utf8')).model.architecture || hint;
  } catch {
    // An axis without its manifest: the hint stays unknown (llama.cpp only warns on a mismatch).
  }
  const directions = layers
    .map((layer, row) => ({ layer, row }))
    .filter(({ layer }) => layer >= 1)
    .map(({ layer, row }) => ({ name: `direction.${layer}`, shape: [hidden], data: Float32Array.from(axis.data.subarray(row * hidden, (row + 1) * hidden), (x) => x * scale) }));
  if (!directions.length) throw new ExportError(`${axisFile}: no row for a layer above 0 (llama.cpp has no direction.0)`);
  await writeFileAtomic(
    out,
    encodeGguf(
      {
        'general.architecture': { type: 'string', value: 'controlvector' },
        'controlvector.model_hint': { type: 'string', value: hint },
        'controlvector.layer_count': { type: 'uint32', value: directions.length },
      },
      directions,
    ),
  );
  return directions.map((d) => Number(d.name.slice('direction.'.length)));
}
