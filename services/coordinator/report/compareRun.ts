import * as fs from 'node:fs';
import * as path from 'node:path';
import { readSafetensors, SafetensorsSlices } from '../../shared/safetensors';
import { projectRow, unitRows } from '../../shared/projection';
import { cosine } from './analysis';

/** What a finished run's directory holds that a comparison reads (vectors/ besides). */
export const COMPARE_RUN_FILES = ['axis.safetensors', 'manifest.json'];

/** A run that cannot be compared with (another shape, a file missing or unreadable): the message says which. */
export class CompareRunError extends Error {}

/**
 * A run against another (usually a capped run against the uncapped run of the same model and
 * role set, as the paper compares them), in the other run's frame: every role's and default
 * vector's projection on the other run's unit axis at the target layer, in both runs.
 */
export interface RunComparison {
  name: string;
  /** The axis row compared at (the report's target layer) and the layer it is. */
  row: number;
  layer: number;
  capping: { this: string; other: string };
  /** Cosine between the two runs' axes at that row. */
  axis_cosine: number;
  /** Projections on the other run's unit axis; null where the role has no vector in that run. */
  roles: { role: string; kind: 'role' | 'default'; this: number | null; other: number | null }[];
  /** Means over the roles with a vector in both runs (role-play roles, default roles), and this minus other. */
  mean: { roles: { this: number; other: number; shift: number; count: number }; defaults: { this: number; other: number; shift: number; count: number } };
  /** The judge's scores over every role-play answer of each run: score -> answers. */
  scores: { this: Record<string, number>; other: Record<string, number> };
}

/** This run's side, as the end of the run has it. */
export interface ThisRun {
  dir: string;
  model: string;
  capping: string;
  /** Rows of the axis: the layers they are. */
  layers: number[];
  axis: Float32Array;
  hidden: number;
  row: number;
  roles: string[];
  defaults: string[];
  /** Role-play roles judged (kept and left out), with their score histograms. */
  histograms: Record<string, Record<string, number>>;
  judgedRoles: string[];
}

interface Manifest {
  model?: { name?: string };
  capping?: string | { experiment?: string };
  results?: { roles_kept?: { role: string }[]; roles_left_out?: { role: string }[]; defaults?: { role: string }[] };
}

/** The comparison of `self` with the finished run in `otherDir` (read from its files). */
export async function compareRun(self: ThisRun, otherDir: string): Promise<RunComparison> {
  const name = path.basename(otherDir);
  let manifest: Manifest;
  try {
    manifest = JSON.parse(fs.readFileSync(path.join(otherDir, 'manifest.json'), 'utf8')) as Manifest;
  } catch (err) {
    throw new CompareRunError(`${path.join(otherDir, 'manifest.json')}: ${(err as Error).message}`);
  }
  if (manifest.model?.name !== self.model) throw new CompareRunError(`run ${name} is of model ${JSON.stringify(manifest.model?.name)}, this run of ${JSON.stringify(self.model)}`);
  const { tensors } = await readSafetensors(path.join(otherDir, 'axis.safetensors'));
  const axis = tensors.axis;
  const layers = tensors.layer_index ? Array.from(tensors.layer_index.data) : axis ? [...Array(axis.shape[0]).keys()] : [];
  if (!axis || axis.shape[1] !== self.hidden || JSON.stringify(layers) !== JSON.stringify(self.layers)) {
    throw new CompareRunError(`run ${name} kept other layers or another hidden size (layers ${layers.join(',')}, hidden ${axis?.shape[1]}; this run: layers ${self.layers.join(',')}, hidden ${self.hidden})`);
  }
  const d = self.hidden;
  const otherRow = axis.data.subarray(self.row * d, (self.row + 1) * d);
  const frame = unitRows(otherRow, 1, d);
  // A role's vector row in a run's directory, projected on the frame; null when the run has none.
  const projection = async (dir: string, role: string): Promise<number | null> => {
    const file = path.join(dir, 'vectors', `${role}.safetensors`);
    if (!fs.existsSync(file)) return null;
    const slices = await SafetensorsSlices.open(file, 'vector');
    return projectRow(await slices.read(self.row * d, d), 0, frame, 0, d);
  };
  const names = (list?: { role: string }[]) => (list ?? []).map((r) => r.role);
  const otherRoles = names(manifest.results?.roles_kept);
  const otherDefaults = names(manifest.results?.defaults);
  const roles: RunComparison['roles'] = [];
  for (const [kind, mine, theirs] of [['role', self.roles, otherRoles], ['default', self.defaults, otherDefaults]] as const) {
    for (const role of [...new Set([...mine, ...theirs])].sort()) {
      roles.push({ role, kind, this: mine.includes(role) ? await projection(self.dir, role) : null, other: theirs.includes(role) ? await projection(otherDir, role) : null });
    }
  }
  const meanOf = (kind: 'role' | 'default') => {
    const both = roles.filter((r) => r.kind === kind && r.this !== null && r.other !== null);
    const avg = (pick: (r: (typeof both)[number]) => number) => (both.length ? both.reduce((s, r) => s + pick(r), 0) / both.length : 0);
    const [a, b] = [avg((r) => r.this!), avg((r) => r.other!)];
    return { this: a, other: b, shift: a - b, count: both.length };
  };
  let otherHistograms: Record<string, Record<string, number>> = {};
  try {
    otherHistograms = (JSON.parse(fs.readFileSync(path.join(otherDir, 'report.json'), 'utf8')) as { histograms?: Record<string, Record<string, number>> }).histograms ?? {};
  } catch {
    // A run without its report: its scores are left empty.
  }
  const pooled = (histograms: Record<string, Record<string, number>>, judged: string[]) => {
    const total: Record<string, number> = {};
    for (const role of judged) for (const [score, n] of Object.entries(histograms[role] ?? {})) total[score] = (total[score] ?? 0) + n;
    return total;
  };
  const cappingOf = (c: Manifest['capping']) => (typeof c === 'object' && c?.experiment ? c.experiment : 'none');
  return {
    name,
    row: self.row,
    layer: self.layers[self.row],
    capping: { this: self.capping, other: cappingOf(manifest.capping) },
    axis_cosine: cosine(self.axis.subarray(self.row * d, (self.row + 1) * d), otherRow),
    roles,
    mean: { roles: meanOf('role'), defaults: meanOf('default') },
    scores: { this: pooled(self.histograms, self.judgedRoles), other: pooled(otherHistograms, [...otherRoles, ...names(manifest.results?.roles_left_out)]) },
  };
}
