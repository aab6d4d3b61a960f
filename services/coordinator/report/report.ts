import type { AnswerProjections } from '../../../gen/assistant_axis/v1/common';
import { cosine, dot, norm, pca, targetLayer } from './analysis';
import type { RunComparison } from './compareRun';

export interface ReportInput {
  run: string;
  model: string;
  /** config.json's model_type, which names the paper's models whatever their directory is called. */
  architecture?: string;
  /** Who generated the answers: "this engine", or the OpenAI-compatible server whose answers were measured here. */
  generatedBy?: string;
  numLayers: number;
  hidden: number;
  minCount: number;
  /** The kept roles and the default roles, in the order `layer` gives their vectors' rows. */
  roles: { role: string; count: number }[];
  defaults: { role: string; count: number }[];
  /**
   * Row l of every kept role's vector and of every default vector (float32 [hidden] each): asked
   * for one layer at a time, so that the vectors of a run with many roles are never held whole.
   */
  layer: (l: number) => Promise<LayerRows>;
  leftOut: { role: string; count: number }[];
  histograms: Record<string, Record<string, number>>;
  axis: Float32Array;
  compare?: { name: string; axis: Float32Array };
  /** Another run against this one (compare_run), computed from both runs' files. */
  compareRun?: RunComparison;
  /** Where the run's answers lie on the axis (aggregation's percentiles per group and layer). */
  answerProjections?: AnswerProjections[];
}

export interface LayerRows {
  roles: Float32Array[];
  defaults: Float32Array[];
}

/** `ReportInput.layer` over vectors held in memory ([numLayers * hidden] each). */
export function layersInMemory(roles: Float32Array[], defaults: Float32Array[], hidden: number): (l: number) => Promise<LayerRows> {
  const row = (v: Float32Array, l: number) => v.subarray(l * hidden, (l + 1) * hidden);
  return async (l) => ({ roles: roles.map((v) => row(v, l)), defaults: defaults.map((v) => row(v, l)) });
}

export interface Report {
  run: string;
  model: string;
  generated_by: string;
  num_layers: number;
  hidden_size: number;
  target_layer: number;
  min_count: number;
  axis_norms: number[];
  pca: {
    layer: number;
    explained: number[];
    cumulative: number[];
    roles: { role: string; count: number; pc1: number; pc2: number }[];
    defaults: { role: string; pc1: number; pc2: number }[];
  };
  axis_vs_pc1: number[];
  projections: { role: string; kind: 'role' | 'default'; projection: number }[];
  histograms: Record<string, Record<string, number>>;
  roles_kept: { role: string; count: number }[];
  roles_left_out: { role: string; count: number }[];
  compare?: { name: string; cosine_per_layer: number[] };
  /** compare_run: the vectors of both runs on the other run's axis at the target layer, and both runs' judge scores. */
  compare_run?: RunComparison;
  /**
   * Per group of answers (role_play, role_play_3: scored 3, default, pooled), the percentiles
   * (`levels`) of their projections on the axis at every layer (`by_layer[l][k]`), and at the
   * target layer; from `sample_size` of the group's `total` answers (the lowest hashes of their keys).
   */
  answer_projections: { group: string; sample_size: number; total: number; levels: number[]; at_target: number[]; by_layer: number[][] }[];
}

function layerOf(v: Float32Array, l: number, d: number): Float64Array {
  return Float64Array.from(v.subarray(l * d, (l + 1) * d));
}

/**
 * The report of a finished run: PCA of the role vectors at the target layer (variance
 * explained, roles and default vectors on PC1-PC2), the cosine between the axis and PC1 at
 * every layer, roles ranked by their projection on the axis, the axis norm per layer, each
 * role's score histogram, and, when given, the cosine per layer against another axis.
 *
 * A PCA of 276 role vectors takes most of a second per layer (half a minute for 46 layers):
 * the event loop gets a turn after each layer, so that the service stays responsive (health
 * checks, keepalive pings, watchers) while a large run's report is computed.
 */
export async function buildReport(input: ReportInput, components = 10): Promise<Report> {
  const { numLayers: L, hidden: d } = input;
  const target = targetLayer(input.model, L, input.architecture);
  const axisNorms = Array.from({ length: L }, (_, l) => norm(layerOf(input.axis, l, d)));
  const wide = (rows: Float32Array[]) => rows.map((r) => Float64Array.from(r));
  const axisVsPc1: number[] = [];
  let atTarget: ReturnType<typeof pca> | undefined;
  let targetRows: { roles: Float64Array[]; defaults: Float64Array[] } | undefined;
  const withPca = input.roles.length >= 2;
  for (let l = 0; l < L; l++) {
    if (!withPca && l !== target) {
      axisVsPc1.push(0);
      continue;
    }
    const rows = await input.layer(l);
    const roleRows = wide(rows.roles);
    if (l === target) targetRows = { roles: roleRows, defaults: wide(rows.defaults) };
    if (!withPca) {
      axisVsPc1.push(0);
      continue;
    }
    const p = pca(roleRows, l === target ? components : 1);
    await new Promise((resolve) => setImmediate(resolve));
    if (l === target) atTarget = p;
    axisVsPc1.push(cosine(layerOf(input.axis, l, d), p.components[0]));
  }
  const { roles: roleRows, defaults: defaultRows } = targetRows!;
  const mean = new Float64Array(d);
  for (const r of roleRows) for (let i = 0; i < d; i++) mean[i] += r[i] / input.roles.length;
  const on = (row: Float64Array, c: number) => (atTarget?.components[c] ? dot(row.map((x, i) => x - mean[i]), atTarget.components[c]) : 0);
  const axisT = layerOf(input.axis, target, d);
  const axisNorm = norm(axisT) || 1;
  const projections = [
    ...input.roles.map((r, i) => ({ role: r.role, kind: 'role' as const, projection: dot(roleRows[i], axisT) / axisNorm })),
    ...input.defaults.map((r, i) => ({ role: r.role, kind: 'default' as const, projection: dot(defaultRows[i], axisT) / axisNorm })),
  ].sort((a, b) => b.projection - a.projection);
  let cumulative = 0;
  return {
    run: input.run,
    model: input.model,
    generated_by: input.generatedBy ?? 'this engine',
    num_layers: L,
    hidden_size: d,
    target_layer: target,
    min_count: input.minCount,
    axis_norms: axisNorms,
    pca: {
      layer: target,
      explained: atTarget?.explained ?? [],
      cumulative: (atTarget?.explained ?? []).map((e) => (cumulative += e)),
      roles: input.roles.map((r, i) => ({ role: r.role, count: r.count, pc1: atTarget?.coordinates[i][0] ?? 0, pc2: atTarget?.coordinates[i][1] ?? 0 })),
      defaults: input.defaults.map((r, i) => ({ role: r.role, pc1: on(defaultRows[i], 0), pc2: on(defaultRows[i], 1) })),
    },
    axis_vs_pc1: axisVsPc1,
    projections,
    histograms: input.histograms,
    answer_projections: (input.answerProjections ?? []).map((a) => {
      const k = a.levels.length;
      const byLayer = Array.from({ length: L }, (_, l) => a.percentiles.slice(l * k, (l + 1) * k));
      return { group: a.group, sample_size: Number(a.sampleSize), total: Number(a.total), levels: a.levels, at_target: byLayer[target] ?? [], by_layer: byLayer };
    }),
    roles_kept: input.roles.map((r) => ({ role: r.role, count: r.count })),
    roles_left_out: input.leftOut,
    compare: input.compare && {
      name: input.compare.name,
      cosine_per_layer: Array.from({ length: L }, (_, l) => cosine(layerOf(input.axis, l, d), layerOf(input.compare!.axis, l, d))),
    },
    ...(input.compareRun ? { compare_run: input.compareRun } : {}),
  };
}
