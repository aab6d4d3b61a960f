/**
 * Projections on the axis (docs/CONCEPTS.md): an activation a's projection at layer l is
 * a[l] . axis[l] / |axis[l]|, usually read at the model's target layer.
 */

/**
 * The layer where projections are usually read: the paper's for its three models, known by their
 * architecture and depth (config.json, not a directory's name) or by name, else the middle one.
 */
export function targetLayer(model: string, numLayers: number, architecture = ''): number {
  const m = `${model} ${architecture}`.toLowerCase();
  // Qwen 3 32B's 32 of 64 and Llama 3.3 70B's 40 of 80 are the middle layer already; only Gemma 2 27B's is not.
  if ((m.includes('gemma-2-27b') || m.includes('gemma2')) && numLayers === 46) return 22;
  return Math.floor(numLayers / 2);
}

/** The model layer of each row of an axis file: its metadata "layers" ("0,3,7"), or all layers in order when absent or "all". */
export function axisFileLayers(named: string | undefined, rows: number): number[] {
  return !named || named === 'all' ? [...Array(rows).keys()] : named.split(',').map(Number);
}

/** An axis's rows [rows, hidden] made unit length (float64); a zero row stays zero (its projections are 0). */
export function unitRows(axis: ArrayLike<number>, rows: number, hidden: number): Float64Array {
  const out = new Float64Array(rows * hidden);
  for (let r = 0; r < rows; r++) {
    let sq = 0;
    for (let i = 0; i < hidden; i++) sq += axis[r * hidden + i] ** 2;
    const n = Math.sqrt(sq);
    if (n > 0) for (let i = 0; i < hidden; i++) out[r * hidden + i] = axis[r * hidden + i] / n;
  }
  return out;
}

/** The dot product of `a[offset .. offset+hidden)` with unit row `row`. */
export function projectRow(a: ArrayLike<number>, offset: number, unit: Float64Array, row: number, hidden: number): number {
  let s = 0;
  for (let i = 0; i < hidden; i++) s += a[offset + i] * unit[row * hidden + i];
  return s;
}
