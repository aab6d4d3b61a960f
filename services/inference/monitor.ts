import * as fs from 'node:fs';
import type { GetModelInfoResponse } from '../../gen/assistant_axis/v1/inference';
import { axisFileLayers, targetLayer } from '../shared/projection';
import { decodeSafetensors } from '../shared/safetensors';
import type { FloatTensor } from '../shared/tensor';

/** An axis file (or its metadata) the replica cannot monitor with: the message names the file and what is wrong. */
export class MonitorError extends Error {}

/** Buckets of the projection histogram when the axis file says nothing of where answers lie. */
const FALLBACK_BUCKETS = [-40, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20, 40];

/**
 * Live monitoring (`--monitor-axis`): every answer this replica generates or measures is
 * projected on the axis at the model's target layer (docs/CONCEPTS.md), for the projection
 * histogram and the share of answers below a threshold (the persona alert). The threshold is
 * `--monitor-threshold`, else the axis run's default answers' 25th percentile at that layer
 * (axis.safetensors carries it), else none (no below-threshold count).
 */
export class ProjectionMonitor {
  private constructor(
    readonly file: string,
    /** The model layer read, and the unit axis row there. */
    readonly layer: number,
    private readonly unit: Float64Array,
    readonly threshold: number | undefined,
    readonly buckets: number[],
  ) {}

  static load(file: string, info: GetModelInfoResponse, threshold?: number): ProjectionMonitor {
    let read;
    try {
      read = decodeSafetensors(fs.readFileSync(file), file);
    } catch (err) {
      throw new MonitorError(`--monitor-axis ${file}: ${(err as NodeJS.ErrnoException).code ? `cannot read it (${(err as NodeJS.ErrnoException).code})` : (err as Error).message}`);
    }
    const axis = read.tensors.axis;
    if (!axis || axis.shape.length !== 2) throw new MonitorError(`--monitor-axis ${file}: no [layers, hidden] tensor named "axis"`);
    const [rows, hidden] = axis.shape;
    if (hidden !== info.hiddenSize) throw new MonitorError(`--monitor-axis ${file}: its axis is [${axis.shape}], rows of ${hidden}, but ${info.model} has hidden size ${info.hiddenSize}`);
    const named = read.metadata.layers;
    const layers = axisFileLayers(named, rows);
    if (layers.length !== rows) throw new MonitorError(`--monitor-axis ${file}: its "layers" metadata (${named}) does not name its ${rows} rows`);
    if (!named || named === 'all') {
      if (rows !== info.numLayers) throw new MonitorError(`--monitor-axis ${file}: its axis has ${rows} rows, but ${info.model} has ${info.numLayers} layers`);
    }
    const layer = targetLayer(info.model, info.numLayers, info.architecture);
    const row = layers.indexOf(layer);
    if (row < 0) throw new MonitorError(`--monitor-axis ${file}: no row for layer ${layer}, ${info.model}'s target layer (its rows: ${layers.join(', ')})`);
    const unit = Float64Array.from(axis.data.subarray(row * hidden, (row + 1) * hidden));
    const norm = Math.hypot(...unit);
    if (!(norm > 0)) throw new MonitorError(`--monitor-axis ${file}: the axis is zero at layer ${layer}`);
    for (let i = 0; i < hidden; i++) unit[i] /= norm;
    // Where the run's answers lie at this layer (percentiles 1..99 per group), when the file says.
    let percentiles: Record<string, number[]> = {};
    try {
      const meta = read.metadata.answer_percentiles ? (JSON.parse(read.metadata.answer_percentiles) as { layer: number; groups: Record<string, number[]> }) : undefined;
      if (meta?.layer === layer) percentiles = meta.groups;
    } catch {
      throw new MonitorError(`--monitor-axis ${file}: its "answer_percentiles" metadata is not JSON`);
    }
    const chosen = threshold ?? percentiles.default?.[2];
    if (chosen !== undefined && !Number.isFinite(chosen)) throw new MonitorError(`--monitor-threshold must be a number, got ${chosen}`);
    const known = Object.values(percentiles).flat().filter(Number.isFinite);
    const buckets = known.length ? spread(Math.min(...known), Math.max(...known)) : FALLBACK_BUCKETS;
    return new ProjectionMonitor(file, layer, unit, chosen, [...new Set([...buckets, ...(chosen === undefined ? [] : [chosen])])].sort((a, b) => a - b));
  }

  /** The unit axis at the monitored layer, as a one-row tensor (what a projection pass takes). */
  unitRow(): FloatTensor {
    return { shape: [1, this.unit.length], data: Float32Array.from(this.unit) };
  }

  /** The projection of an activation [rows, hidden] whose rows are `layers` (all when empty); undefined when it lacks the target layer. */
  project(activation: FloatTensor, layers: number[]): number | undefined {
    const row = layers.length ? layers.indexOf(this.layer) : this.layer;
    if (row < 0 || row >= activation.shape[0]) return undefined;
    const d = this.unit.length;
    let s = 0;
    for (let i = 0; i < d; i++) s += activation.data[row * d + i] * this.unit[i];
    return s;
  }
}

/** 20 buckets over [lo, hi] widened by a quarter of the span each side, rounded to 3 significant digits. */
function spread(lo: number, hi: number): number[] {
  const span = hi - lo || Math.abs(hi) || 1;
  const from = lo - span / 4;
  const step = (span * 1.5) / 20;
  return Array.from({ length: 21 }, (_, i) => Number((from + i * step).toPrecision(3)));
}
