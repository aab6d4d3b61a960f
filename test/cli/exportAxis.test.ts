import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { gguf, GGMLQuantizationType } from '@huggingface/gguf';
import { ExportError, exportControlVector, exportHfDataset } from '../../services/cli/exportAxis';
import { readSafetensors, writeSafetensors } from '../../services/shared/safetensors';
import { tempDir } from '../kit/files';
import { ROOT } from '../kit/stack';

/**
 * A run's axis as a llama.cpp control vector, read back with Hugging Face's GGUF parser (from
 * the npm registry, not this project's writer): the metadata llama.cpp reads, one float32
 * `direction.i` per layer above 0 (llama.cpp adds direction.i to block i's output and has no
 * direction.0), the values the axis's rows times the scale.
 */
const L = 5;
const D = 8;
const axisValues = Float32Array.from({ length: L * D }, (_, i) => Math.fround(Math.sin(i) * 3));

async function runDir(layers = 'all', rows = L): Promise<string> {
  const dir = tempDir('export-run');
  await writeSafetensors(path.join(dir, 'axis.safetensors'), { axis: { shape: [rows, D], data: axisValues.slice(0, rows * D) } }, { model: 'tiny', run: 'r', layers });
  fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify({ model: { architecture: 'llama' } }));
  return dir;
}

async function readBack(file: string): Promise<{ metadata: Record<string, unknown>; directions: Record<string, number[]> }> {
  const parsed = await gguf(file, { allowLocalFile: true });
  const bytes = fs.readFileSync(file);
  const directions: Record<string, number[]> = {};
  for (const t of parsed.tensorInfos) {
    expect({ name: t.name, dtype: t.dtype, shape: t.shape.map(Number) }).toEqual({ name: t.name, dtype: GGMLQuantizationType.F32, shape: [D] });
    const at = Number(parsed.tensorDataOffset + t.offset);
    directions[t.name] = Array.from({ length: D }, (_, i) => bytes.readFloatLE(at + 4 * i));
  }
  return { metadata: parsed.metadata as Record<string, unknown>, directions };
}

describe('axis export as a llama.cpp control vector', () => {
  it('writes direction.1..L-1 from the axis rows of those layers, scaled, with the metadata llama.cpp reads', async () => {
    const out = path.join(tempDir('export'), 'axis.gguf');
    expect(await exportControlVector(await runDir(), out, 2)).toEqual([1, 2, 3, 4]);
    const { metadata, directions } = await readBack(out);
    expect(metadata).toMatchObject({ 'general.architecture': 'controlvector', 'controlvector.model_hint': 'llama', 'controlvector.layer_count': 4 });
    expect(Object.keys(directions)).toEqual(['direction.1', 'direction.2', 'direction.3', 'direction.4']);
    for (let l = 1; l < L; l++) expect(directions[`direction.${l}`]).toEqual(Array.from(axisValues.subarray(l * D, (l + 1) * D), (x) => Math.fround(x * 2)));
  });

  it('puts the rows of a run that kept some layers at their own layer numbers', async () => {
    const out = path.join(tempDir('export-subset'), 'axis.gguf');
    expect(await exportControlVector(await runDir('0,3,7', 3), out)).toEqual([3, 7]);
    const { directions } = await readBack(out);
    expect(directions).toEqual({ 'direction.3': Array.from(axisValues.subarray(D, 2 * D)), 'direction.7': Array.from(axisValues.subarray(2 * D, 3 * D)) });
  });

  it('refuses what is not a finished run\'s axis, naming the file; the CLI says so and writes nothing', async () => {
    const empty = tempDir('export-empty');
    await expect(exportControlVector(empty, path.join(empty, 'x.gguf'))).rejects.toThrow(new ExportError(`${path.join(empty, 'axis.safetensors')}: no such file: is ${empty} a finished run's directory?`));
    await expect(exportControlVector(await runDir('0', 1), path.join(empty, 'y.gguf'))).rejects.toThrow(/no row for a layer above 0 \(llama\.cpp has no direction\.0\)/);
    const cli = path.join(ROOT, 'dist', 'services', 'cli', 'axis.js');
    const run = (args: string[]) => promisify(execFile)(process.execPath, [cli, ...args]).then(({ stdout }) => ({ code: 0, out: stdout }), (err: { code: number; stderr: string }) => ({ code: err.code, out: err.stderr }));
    expect(await run(['export', 'r', '--run-dir', empty, '--format', 'gguf-control-vector', '--out', path.join(empty, 'z.gguf')])).toMatchObject({ code: 2, out: expect.stringContaining('no such file') });
    expect(await run(['export', 'r', '--run-dir', empty, '--format', 'pt', '--out', path.join(empty, 'z.gguf')])).toMatchObject({ code: 2, out: expect.stringContaining('--format must be one of gguf-control-vector') });
    expect(fs.readdirSync(empty).filter((f) => f.endsWith('.gguf'))).toEqual([]);
    const good = await runDir();
    expect(await run(['export', 'r', '--run-dir', good, '--format', 'gguf-control-vector', '--out', path.join(good, 'a.gguf')])).toMatchObject({ code: 0, out: expect.stringContaining('a control vector of 4 layers (direction.1..direction.4), scale 1') });
  });

  it('writes the published dataset\'s layout: the axis, the default vector and each role vector, as safetensors', async () => {
    const dir = await runDir();
    const v = (k: number) => ({ shape: [L, D], data: Float32Array.from({ length: L * D }, (_, i) => i + 1000 * k) });
    await writeSafetensors(path.join(dir, 'axis.safetensors'), { axis: { shape: [L, D], data: axisValues }, default_mean: v(9) }, { layers: 'all' });
    for (const [k, role] of ['chef', 'default', 'poet'].entries()) await writeSafetensors(path.join(dir, 'vectors', `${role}.safetensors`), { vector: v(k) });
    fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify({ model: { name: 'org/tiny-llama', architecture: 'llama' } }));
    const out = tempDir('export-hf');
    expect((await exportHfDataset(dir, out)).sort()).toEqual(['tiny-llama/assistant_axis.safetensors', 'tiny-llama/default_vector.safetensors', 'tiny-llama/role_vectors/chef.safetensors', 'tiny-llama/role_vectors/poet.safetensors']);
    const read = async (f: string, t: string) => Array.from((await readSafetensors(path.join(out, 'tiny-llama', f))).tensors[t].data);
    expect(await read('assistant_axis.safetensors', 'axis')).toEqual(Array.from(axisValues));
    expect(await read('default_vector.safetensors', 'vector')).toEqual(Array.from(v(9).data));
    expect(await read('role_vectors/poet.safetensors', 'vector')).toEqual(Array.from(v(2).data));
    // A model name that is not a plain name never becomes a path.
    fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify({ model: { name: 'org/..' } }));
    await expect(exportHfDataset(dir, out)).rejects.toThrow(/the model name "org\/\.\." does not make a directory name/);
  });
});
