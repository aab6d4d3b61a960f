import type { Tensor } from '../../gen/assistant_axis/v1/common';
import { addTensorInto, FloatTensor } from '../shared/tensor';

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

/** An activation's values: decoded, or the checked wire tensor itself (added without decoding). */
export type ActivationValues = Float32Array | Tensor;

export function addValues(sum: Float64Array, values: ActivationValues): void {
  if (values instanceof Float32Array) for (let i = 0; i < sum.length; i++) sum[i] += values[i];
  else addTensorInto(sum, values);
}

export function addInto(target: Sum, activation: ActivationValues): void {
  addValues(target.sum, activation);
  target.count++;
}

export function mean(s: Sum): Float64Array {
  const out = new Float64Array(s.sum.length);
  for (let i = 0; i < out.length; i++) out[i] = s.sum[i] / s.count;
  return out;
}

/** A role and how many of its items make its vector. */
export interface RoleCount {
  role: string;
  isDefault: boolean;
  count: number;
}

/** Which roles make the axis: decided from the counts alone, before any sum is read. */
export interface AxisPlan {
  kept: RoleCount[];
  leftOut: RoleCount[];
  defaults: RoleCount[];
}

/**
 * A role is kept only with at least `minCount` selected items; with no role kept (or no
 * default items) there is no axis, and the error lists every role's count instead of NaN.
 */
export function planAxis(roles: RoleCount[], minCount: number): AxisPlan {
  const plan: AxisPlan = { kept: [], leftOut: [], defaults: [] };
  for (const r of roles) {
    if (r.isDefault) {
      if (r.count > 0) plan.defaults.push(r);
    } else if (r.count >= minCount && r.count > 0) {
      plan.kept.push(r);
    } else {
      plan.leftOut.push(r);
    }
  }
  const counts = () => roles.filter((r) => !r.isDefault).map((r) => `${r.role}=${r.count}`).join(', ');
  if (plan.kept.length === 0) throw new NoAxisError(`no role reached min_count=${minCount} items with the selected scores; counts: ${counts() || '(no roles)'}`);
  if (plan.defaults.length === 0) throw new NoAxisError('no default items: the axis needs at least one default role (a role whose name contains "default") with items');
  return plan;
}

export type AxisPart = { vector: RoleCount & { vector: Float64Array } } | { axis: Float64Array; norms: number[] };

/**
 * axis = mean over default vectors - unweighted mean over role vectors (docs/CONCEPTS.md).
 * The vectors come one at a time, kept roles then defaults, each from its role's selected sum
 * read when its turn comes, and the axis last: a run with many roles never holds more than a
 * few sums at once.
 */
export function* axisParts(plan: AxisPlan, selectedSum: (role: string) => Float64Array, numLayers: number, hidden: number): Generator<AxisPart> {
  const size = numLayers * hidden;
  const roleMean = new Float64Array(size);
  for (const k of plan.kept) {
    const vector = mean({ sum: selectedSum(k.role), count: k.count });
    for (let i = 0; i < size; i++) roleMean[i] += vector[i];
    yield { vector: { ...k, vector } };
  }
  const axis = new Float64Array(size);
  for (const d of plan.defaults) {
    const vector = mean({ sum: selectedSum(d.role), count: d.count });
    for (let i = 0; i < size; i++) axis[i] += vector[i] / plan.defaults.length;
    yield { vector: { ...d, vector } };
  }
  for (let i = 0; i < size; i++) axis[i] -= roleMean[i] / plan.kept.length;
  yield { axis, norms: layerNorms(axis, numLayers, hidden) };
}

/** The whole result at once, from sums in memory (tests and small runs). */
export function computeAxis(roles: RoleSums[], minCount: number, numLayers: number, hidden: number): AxisResult {
  const plan = planAxis(roles.map((r) => ({ role: r.role, isDefault: r.isDefault, count: r.selected.count })), minCount);
  const sums = new Map(roles.map((r) => [r.role, r.selected.sum]));
  const result: AxisResult = { kept: [], leftOut: plan.leftOut.map(({ role, count }) => ({ role, count })), defaults: [], axis: new Float64Array(0), norms: [] };
  for (const part of axisParts(plan, (role) => sums.get(role)!, numLayers, hidden)) {
    if ('vector' in part) (part.vector.isDefault ? result.defaults : result.kept).push({ role: part.vector.role, count: part.vector.count, vector: part.vector.vector });
    else Object.assign(result, part);
  }
  return result;
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
