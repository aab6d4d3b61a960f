import * as fs from 'node:fs';
import * as path from 'node:path';
import { writeFileAtomic } from '../shared/files';
import { axisFileLayers } from '../shared/projection';
import { encodeGguf } from '../shared/gguf';
import { readSafetensors, writeSafetensors } from '../shared/safetensors';

/**
 * A finished run's vectors in the layout of the published axes (the Hugging Face dataset of
 * the reference): `<out>/<model>/assistant_axis.safetensors` (tensor `axis`),
 * `default_vector.safetensors` (`vector`: the default roles' mean), `role_vectors/<role>.safetensors`
 * (`vector`), each [layers, hidden] float32. `<model>` is the last part of the run's model name.
 * Returns the files written. docs/CONCEPTS.md has the Python lines that turn them into the
 * published `.pt` files and back.
 */
export async function exportHfDataset(runDir: string, out: string): Promise<string[]> {
  const { tensors } = await readAxisFile(runDir);
  let name: string;
  try {
    name = String(JSON.parse(fs.readFileSync(path.join(runDir, 'manifest.json'), 'utf8')).model.name);
  } catch (err) {
    throw new ExportError(`${path.join(runDir, 'manifest.json')}: cannot read the run's model name (${(err as Error).message})`);
  }
  // A model name becomes a directory: only its last part, and only if it is a plain name.
  const model = name.split('/').pop() ?? '';
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(model)) throw new ExportError(`${path.join(runDir, 'manifest.json')}: the model name ${JSON.stringify(name)} does not make a directory name`);
  const base = path.join(out, model);
  const written: string[] = [];
  const write = async (file: string, t: Record<string, { shape: number[]; data: Float32Array }>) => {
    await writeSafetensors(path.join(base, file), t, { model: name });
    written.push(path.join(model, file));
  };
  await write('assistant_axis.safetensors', { axis: tensors.axis });
  const vectors = path.join(runDir, 'vectors');
  const files = fs.existsSync(vectors) ? fs.readdirSync(vectors).filter((f) => f.endsWith('.safetensors')).sort() : [];
  for (const f of files) {
    const role = f.slice(0, -'.safetensors'.length);
    const v = (await readSafetensors(path.join(vectors, f))).tensors.vector;
    if (!v) throw new ExportError(`${path.join(vectors, f)}: no tensor named vector`);
    // The default roles' mean is the published default_vector; the others are role vectors.
    if (role !== 'default') await write(path.join('role_vectors', f), { vector: v });
  }
  if (tensors.default_mean) await write('default_vector.safetensors', { vector: tensors.default_mean });
  else if (files.includes('default.safetensors')) await write('default_vector.safetensors', { vector: (await readSafetensors(path.join(vectors, 'default.safetensors'))).tensors.vector });
  return written;
}

export const EXPORT_FORMATS = ['gguf-control-vector', 'hf-dataset'] as const;
export type ExportFormat = (typeof EXPORT_FORMATS)[number];

/** A finished run's directory cannot be exported: the message names the file and what is wrong. */
export class ExportError extends Error {}

/** A finished run's axis.safetensors, with its [layers, hidden] tensor `axis`. */
async function readAxisFile(runDir: string) {
  const file = path.join(runDir, 'axis.safetensors');
  if (!fs.existsSync(file)) throw new ExportError(`${file}: no such file: is ${runDir} a finished run's directory?`);
  const read = await readSafetensors(file);
  if (read.tensors.axis?.shape.length !== 2) throw new ExportError(`${file}: no [layers, hidden] tensor named axis`);
  return { file, ...read };
}

/**
 * A finished run's axis as a llama.cpp control vector: GGUF with `general.architecture =
 * controlvector`, `controlvector.model_hint` (the model's architecture), `controlvector.layer_count`
 * and one float32 tensor `direction.<i>` [hidden] per layer, `scale` times the axis's row for
 * layer i. Layer numbering: llama.cpp adds `direction.i` to the output of block i (0-based,
 * what this project's row i is) and has no `direction.0`, so block 0's row is left out. Rows of
 * a run that kept a subset of layers go to their own layer numbers. Returns the layers written.
 */
export async function exportControlVector(runDir: string, out: string, scale = 1): Promise<number[]> {
  const { file: axisFile, tensors, metadata } = await readAxisFile(runDir);
  const axis = tensors.axis;
  const [rows, hidden] = axis.shape;
  const layers = axisFileLayers(metadata.layers, rows);
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
