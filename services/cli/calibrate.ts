import * as fs from 'node:fs';
import * as path from 'node:path';
import { writeFileAtomic } from '../shared/files';
import { axisFileLayers } from '../shared/projection';
import { readSafetensors, writeSafetensors } from '../shared/safetensors';

/** A finished run that cannot be calibrated from, or bad flags: the message names the file or flag. */
export class CalibrationError extends Error {}

/** The paper's bands: Qwen 3 32B layers 46..53 of 64, Llama 3.3 70B 56..71 of 80 ([first, end)). */
const PAPER_BANDS: { match: RegExp; layers: number; band: [number, number] }[] = [
  { match: /qwen3-32b/i, layers: 64, band: [46, 54] },
  { match: /llama-3\.3-70b/i, layers: 80, band: [56, 72] },
];

/**
 * Bands of layers in the upper half of a model of `n` layers: the paper's widths (an eighth and
 * a quarter of the depth: 8 and 16 of Qwen 3 32B's 64) at half-width steps from the middle up,
 * and the paper's own band for its models.
 */
export function defaultBands(model: string, n: number): [number, number][] {
  const bands: [number, number][] = [];
  for (const width of [Math.max(1, Math.round(n / 8)), Math.max(1, Math.round(n / 4))]) {
    const step = Math.max(1, Math.floor(width / 2));
    for (let first = Math.floor(n / 2); first + width <= n; first += step) bands.push([first, first + width]);
  }
  for (const p of PAPER_BANDS) if (p.match.test(model) && p.layers === n) bands.push(p.band);
  const seen = new Set<string>();
  return bands.filter(([a, b]) => !seen.has(`${a}:${b}`) && seen.add(`${a}:${b}`) !== undefined).sort((x, y) => x[0] - y[0] || x[1] - y[1]);
}

/** `a:b,c:d` as bands [first, end). */
export function parseBands(text: string, n: number): [number, number][] {
  return text.split(',').map((part) => {
    const m = /^(\d+):(\d+)$/.exec(part.trim());
    if (!m) throw new CalibrationError(`--layer-ranges: ${JSON.stringify(part)} is not first:end`);
    const band: [number, number] = [Number(m[1]), Number(m[2])];
    if (!(band[0] < band[1] && band[1] <= n)) throw new CalibrationError(`--layer-ranges: ${part} is not a band of the model's layers 0..${n} (end excluded)`);
    return band;
  });
}

/**
 * A finished run's capping config (docs/CONCEPTS.md, "Capping"): for each layer of the bands,
 * the vector -axis[l]; for each band and percentile p, an experiment `layers_a:b-p0.25` capping
 * every layer of the band at tau = -t, t the p-th percentile of the run's answers' projections
 * on the unit axis at that layer (role-play and default answers pooled: report.json's
 * answer_projections), so that <h, axis_hat[l]> >= t. Writes PREFIX.json and PREFIX.safetensors.
 */
export async function calibrate(runDir: string, prefix: string, opts: { percentiles: number[]; bands?: string }): Promise<{ experiments: string[]; vectors: number }> {
  const axisFile = path.join(runDir, 'axis.safetensors');
  if (!fs.existsSync(axisFile)) throw new CalibrationError(`${axisFile}: no such file: is ${runDir} a finished run's directory?`);
  const { tensors, metadata } = await readSafetensors(axisFile);
  const axis = tensors.axis;
  if (axis?.shape.length !== 2) throw new CalibrationError(`${axisFile}: no [layers, hidden] tensor named axis`);
  const [rows, hidden] = axis.shape;
  const layers = axisFileLayers(metadata.layers, rows);
  const reportFile = path.join(runDir, 'report.json');
  let report: { model: string; num_layers: number; answer_projections?: { group: string; levels: number[]; by_layer: number[][] }[] };
  try {
    report = JSON.parse(fs.readFileSync(reportFile, 'utf8'));
  } catch (err) {
    throw new CalibrationError(`${reportFile}: cannot read the run's report (${(err as Error).message})`);
  }
  const pooled = report.answer_projections?.find((a) => a.group === 'pooled');
  if (!pooled) throw new CalibrationError(`${reportFile}: no answer_projections (the run finished before answers were placed on its axis): run it again to calibrate from it`);
  for (const p of opts.percentiles) if (!pooled.levels.includes(p)) throw new CalibrationError(`--percentiles: ${p} is not among the percentiles the run reports (${pooled.levels.join(', ')})`);
  const depth = Math.max(...layers) + 1;
  const bands = opts.bands ? parseBands(opts.bands, depth) : defaultBands(report.model, depth);
  const vectors: Record<string, { layer: number }> = {};
  const values: Record<string, { shape: number[]; data: Float32Array }> = {};
  const experiments: { id: string; interventions: { vector: string; cap: number }[] }[] = [];
  for (const [a, b] of bands) {
    for (const p of opts.percentiles) {
      const interventions = [];
      for (let l = a; l < b; l++) {
        const row = layers.indexOf(l);
        if (row < 0) throw new CalibrationError(`--layer-ranges: layer ${l} is not among the run's layers (${metadata.layers})`);
        const name = `neg_axis_l${l}`;
        vectors[name] = { layer: l };
        values[name] = { shape: [hidden], data: Float32Array.from(axis.data.subarray(row * hidden, (row + 1) * hidden), (x) => -x) };
        const t = pooled.by_layer[row][pooled.levels.indexOf(p)];
        interventions.push({ vector: name, cap: -t });
      }
      experiments.push({ id: `layers_${a}:${b}-p${p / 100}`, interventions });
    }
  }
  await writeFileAtomic(`${prefix}.json`, JSON.stringify({ format: 'assistant-axis-capping/1', model: report.model, run: path.basename(runDir), percentiles: opts.percentiles, vectors, experiments }, null, 2) + '\n');
  await writeSafetensors(`${prefix}.safetensors`, values, { model: report.model });
  return { experiments: experiments.map((e) => e.id), vectors: Object.keys(vectors).length };
}
