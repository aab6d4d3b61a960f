import type { FloatTensor } from '../shared/tensor';

/** Running float64 sums of one bucket of items, shape [layers * hidden]. */
export interface Sum {
  sum: Float64Array;
  count: number;
}

export interface RoleSums {
  role: string;
  isDefault: boolean;
  /** Items that make the role's vector: score-3 items (or the chosen score set) for roles, all items for default roles. */
  selected: Sum;
}

export interface AxisResult {
  /** Role vectors of the roles kept, in the order given. */
  kept: { role: string; count: number; vector: Float64Array }[];
  leftOut: { role: string; count: number }[];
  defaults: { role: string; count: number; vector: Float64Array }[];
  axis: Float64Array;
  norms: number[];
}

export class NoAxisError extends Error {}

export function addInto(target: Sum, activation: Float32Array): void {
  const s = target.sum;
  for (let i = 0; i < s.length; i++) s[i] += activation[i];
  target.count++;
}

export function mean(s: Sum): Float64Array {
  const out = new Float64Array(s.sum.length);
  for (let i = 0; i < out.length; i++) out[i] = s.sum[i] / s.count;
  return out;
}

/**
 * axis = mean over default vectors - unweighted mean over role vectors (DESIGN.md section 1).
 * A role is kept only with at least `minCount` selected items; with no role kept (or no
 * default items) there is no axis, and the error lists every role's count instead of NaN.
 */
export function computeAxis(roles: RoleSums[], minCount: number, numLayers: number, hidden: number): AxisResult {
  const size = numLayers * hidden;
  const kept: AxisResult['kept'] = [];
  const leftOut: AxisResult['leftOut'] = [];
  const defaults: AxisResult['defaults'] = [];
  for (const r of roles) {
    if (r.isDefault) {
      if (r.selected.count > 0) defaults.push({ role: r.role, count: r.selected.count, vector: mean(r.selected) });
    } else if (r.selected.count >= minCount && r.selected.count > 0) {
      kept.push({ role: r.role, count: r.selected.count, vector: mean(r.selected) });
    } else {
      leftOut.push({ role: r.role, count: r.selected.count });
    }
  }
  const counts = () => roles.filter((r) => !r.isDefault).map((r) => `${r.role}=${r.selected.count}`).join(', ');
  if (kept.length === 0) throw new NoAxisError(`no role reached min_count=${minCount} items with the selected scores; counts: ${counts() || '(no roles)'}`);
  if (defaults.length === 0) throw new NoAxisError('no default items: the axis needs at least one default role (a role whose name contains "default") with items');
  const axis = new Float64Array(size);
  for (const d of defaults) for (let i = 0; i < size; i++) axis[i] += d.vector[i] / defaults.length;
  const roleMean = new Float64Array(size);
  for (const k of kept) for (let i = 0; i < size; i++) roleMean[i] += k.vector[i];
  for (let i = 0; i < size; i++) axis[i] -= roleMean[i] / kept.length;
  return { kept, leftOut, defaults, axis, norms: layerNorms(axis, numLayers, hidden) };
}

export function layerNorms(x: ArrayLike<number>, numLayers: number, hidden: number): number[] {
  const norms: number[] = [];
  for (let l = 0; l < numLayers; l++) {
    let s = 0;
    for (let i = 0; i < hidden; i++) s += x[l * hidden + i] ** 2;
    norms.push(Math.sqrt(s));
  }
  return norms;
}

export function toFloat32(x: Float64Array, numLayers: number, hidden: number): FloatTensor {
  return { shape: [numLayers, hidden], data: Float32Array.from(x) };
}
