import * as path from 'node:path';
import type { AnswerProjections } from '../../gen/assistant_axis/v1/common';
import { targetLayer } from '../shared/projection';
import { writeFileAtomic } from '../shared/files';
import { SafetensorsSlices, writeSafetensors } from '../shared/safetensors';
import { decodeTensor } from '../shared/tensor';
import { readAxisFile } from './confine';
import { manifest, RunSummary } from './manifest';
import { reportHtml } from './report/html';
import { compareRun, RunComparison } from './report/compareRun';
import { buildReport, ReportInput } from './report/report';
import { RunFailure } from './retry';
import type { RunContext } from './runContext';

/**
 * The end of a run, once aggregation holds every item: the role vectors and the axis as
 * aggregation streams them (each vector written to its file as it arrives and not kept),
 * then the report (which reads the vectors back a layer at a time) and the manifest.
 */
export async function writeRunResults(ctx: RunContext): Promise<RunSummary> {
  const { spec, runDir } = ctx;
  const meta = (extra: Record<string, string>) => ({ model: spec.model, run: spec.name, layers: spec.layers.length ? spec.layers.join(',') : 'all', ...extra });
  let summary: RunSummary | undefined;
  const kept: ReportInput['roles'] = [];
  const defaults: ReportInput['defaults'] = [];
  let axisTensor: Float32Array | undefined;
  let histograms: Record<string, Record<string, number>> = {};
  // The means the axis is the difference of (the reference's 5_axis.py saves them beside it), summed as the vectors stream by.
  let roleSum: Float64Array | undefined;
  let defaultSum: Float64Array | undefined;
  for await (const r of ctx.upstreams.aggregation.computeAxis({ run: spec.name, minCount: spec.minCount, scores: [] })) {
    if (r.result?.$case === 'vector') {
      const v = r.result.value;
      const t = decodeTensor(v.vector, `vector of ${v.role}`);
      (v.isDefault ? defaults : kept).push({ role: v.role, count: v.count });
      const sum = v.isDefault ? (defaultSum ??= new Float64Array(t.data.length)) : (roleSum ??= new Float64Array(t.data.length));
      for (let i = 0; i < sum.length; i++) sum[i] += t.data[i];
      await writeSafetensors(path.join(runDir, 'vectors', `${v.role}.safetensors`), { vector: t }, meta({ role: v.role, count: String(v.count), scores: v.isDefault ? 'all' : '3' }));
    } else if (r.result?.$case === 'axis') {
      const a = r.result.value;
      const t = decodeTensor(a.axis, 'axis');
      axisTensor = t.data;
      histograms = Object.fromEntries([...a.kept, ...a.leftOut, ...a.defaults].map((c) => [c.role, c.histogram]));
      summary = {
        kept: a.kept.map((k) => ({ role: k.role, count: k.count })),
        leftOut: a.leftOut.map((k) => ({ role: k.role, count: k.count })),
        defaults: a.defaults.map((k) => ({ role: k.role, count: k.count })),
        axisNorms: a.norms,
        numLayers: t.shape[0],
        hiddenSize: t.shape[1],
        answerProjections: a.answerProjections,
      };
      const [rows, hidden] = t.shape;
      const mean = (sum: Float64Array | undefined, n: number) => ({ shape: [rows, hidden], data: Float32Array.from(sum ?? new Float64Array(rows * hidden), (x) => x / Math.max(1, n)) });
      await writeSafetensors(
        path.join(runDir, 'axis.safetensors'),
        {
          axis: t,
          default_mean: mean(defaultSum, defaults.length),
          role_mean: mean(roleSum, kept.length),
          // Which layer each row is (a run that kept a subset of layers has rows that are not layers 0..n-1).
          layer_index: { shape: [rows], data: Float32Array.from(spec.layers.length ? spec.layers : [...Array(rows).keys()]) },
        },
        meta({ min_count: String(spec.minCount), roles_kept: String(a.kept.length), roles_left_out: String(a.leftOut.length), counts: JSON.stringify(Object.fromEntries(a.kept.map((k) => [k.role, k.count]))), ...answerPercentiles(a.answerProjections, spec.layers.length ? spec.layers : [...Array(rows).keys()], targetLayer(spec.model, ctx.items.modelInfo.numLayers || rows, ctx.items.modelInfo.architecture)) }),
      );
    }
  }
  if (!summary || !axisTensor) throw new RunFailure('aggregation returned no axis');
  await writeReport(ctx, summary, kept, defaults, axisTensor, histograms);
  await writeFileAtomic(path.join(runDir, 'manifest.json'), JSON.stringify(manifest(spec, ctx.data, ctx.items.modelInfo, ctx.upstreams.judge.info!, summary), null, 2) + '\n');
  return summary;
}

/**
 * Where the run's answers lie at the model's target layer (each group's percentiles 1..99), as
 * axis.safetensors metadata: what a replica monitoring with this axis takes for its threshold
 * (the default answers' 25th percentile) and its histogram's buckets.
 */
function answerPercentiles(groups: AnswerProjections[], layers: number[], target: number): Record<string, string> {
  const row = layers.indexOf(target);
  if (row < 0 || !groups.length) return {};
  const at = Object.fromEntries(groups.map((g) => [g.group, g.percentiles.slice(row * g.levels.length, (row + 1) * g.levels.length)]));
  return { target_layer: String(target), answer_percentiles: JSON.stringify({ layer: target, levels: groups[0].levels, groups: at }) };
}

/** report.json and report.html: the notebooks' analysis of the finished run. */
async function writeReport(ctx: RunContext, summary: RunSummary, roles: ReportInput['roles'], defaults: ReportInput['defaults'], axis: Float32Array, histograms: Record<string, Record<string, number>>): Promise<void> {
  const { spec, runDir } = ctx;
  // The vectors are read back from their files a layer at a time: 276 roles of [46, 4608] are
  // 234 MB, which the coordinator need not hold.
  const vectorFile = (role: string) => SafetensorsSlices.open(path.join(runDir, 'vectors', `${role}.safetensors`), 'vector');
  const roleFiles = await Promise.all(roles.map((r) => vectorFile(r.role)));
  const defaultFiles = await Promise.all(defaults.map((r) => vectorFile(r.role)));
  const d = summary.hiddenSize;
  const layer = async (l: number) => ({
    roles: await Promise.all(roleFiles.map((f) => f.read(l * d, d))),
    defaults: await Promise.all(defaultFiles.map((f) => f.read(l * d, d))),
  });
  let compare: ReportInput['compare'];
  if (spec.compareAxis) {
    const other = (await readAxisFile(spec.compareAxis)).tensors.axis;
    if (other && other.shape[0] === summary.numLayers && other.shape[1] === d) compare = { name: path.basename(spec.compareAxis), axis: other.data };
    else if (other && spec.layers.length && other.shape[0] === ctx.items.modelInfo.numLayers && other.shape[1] === d) {
      // A whole model's axis, for a run that kept some layers: its rows of those layers.
      const rows = new Float32Array(spec.layers.length * d);
      spec.layers.forEach((l, k) => rows.set(other.data.subarray(l * d, (l + 1) * d), k * d));
      compare = { name: path.basename(spec.compareAxis), axis: rows };
    } else throw new RunFailure(`compare_axis: ${spec.compareAxis} holds an axis of [${other?.shape.join(', ') ?? 'nothing'}], not this run's [${summary.numLayers}, ${d}] (the file changed since the run started?)`);
  }
  let compareWith: RunComparison | undefined;
  if (spec.compareRun) {
    const layers = spec.layers.length ? spec.layers : [...Array(summary.numLayers).keys()];
    const self = {
      dir: runDir,
      model: spec.model,
      capping: spec.cappingExperiment ?? 'none',
      layers,
      axis,
      hidden: d,
      row: targetLayer(spec.model, summary.numLayers, ctx.items.modelInfo.architecture),
      roles: roles.map((r) => r.role),
      defaults: defaults.map((r) => r.role),
      histograms,
      judgedRoles: [...summary.kept, ...summary.leftOut].map((r) => r.role),
    };
    // Checked at StartRun; a run deleted or changed since is left out of the report, with the reason in the log.
    compareWith = await compareRun(self, path.join(path.dirname(runDir), spec.compareRun)).catch((err: Error) => {
      ctx.log.warn({ compareRun: spec.compareRun, err: err.message }, 'compare_run cannot be compared with: left out of the report');
      return undefined;
    });
  }
  const generator = ctx.items.modelInfo.generator;
  const report = await buildReport({
    run: spec.name,
    model: spec.model,
    architecture: ctx.items.modelInfo.architecture,
    generatedBy: generator ? `${generator.model} at ${generator.url} (measured here)` : 'this engine',
    numLayers: summary.numLayers,
    hidden: summary.hiddenSize,
    minCount: spec.minCount,
    roles,
    defaults,
    layer,
    leftOut: summary.leftOut,
    histograms,
    axis,
    compare,
    compareRun: compareWith,
    answerProjections: summary.answerProjections ?? [],
  });
  await writeFileAtomic(path.join(runDir, 'report.json'), JSON.stringify(report, null, 2) + '\n');
  await writeFileAtomic(path.join(runDir, 'report.html'), reportHtml(report));
}
