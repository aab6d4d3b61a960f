import * as path from 'node:path';
import pino from 'pino';
import { Registry } from 'prom-client';
import { Dtype } from '../../gen/assistant_axis/v1/common';
import { inferenceMetrics, monitorMetrics } from '../../services/inference/metrics';
import { ProjectionMonitor } from '../../services/inference/monitor';
import { createInferenceService } from '../../services/inference/service';
import { SyntheticBackend } from '../../services/inference/synthetic';
import { writeSafetensors } from '../../services/shared/safetensors';
import { decodeTensor } from '../../services/shared/tensor';
import { tempDir } from '../kit/files';

/** A replica started with --monitor-axis: each answer's projection at the target layer, the share below the threshold. */
describe('live monitoring of answers on an axis', () => {
  const L = 6;
  const d = 8;
  const axisData = Float32Array.from({ length: L * d }, (_, i) => Math.cos(i * 1.3));
  const axisFile = async (metadata: Record<string, string> = {}, data = axisData, shape = [L, d]) => {
    const file = path.join(tempDir('monitor'), 'axis.safetensors');
    await writeSafetensors(file, { axis: { shape, data } }, metadata);
    return file;
  };
  const sampling = { temperature: 0, topP: 1, maxNewTokens: 16, maxContext: 256, seed: 0, enableThinking: false };

  it('counts every generated and measured answer, by its projection on the unit axis at layer L/2, and those below the threshold', async () => {
    const backend = new SyntheticBackend({ model: 'synthetic-tiny', numLayers: L, hidden: d, tokensPerSecond: 0, itemsPerSecond: 0, capacity: 4, supportsSystemPrompt: true });
    const registry = new Registry();
    const metrics = inferenceMetrics(registry, { inFlight: () => 0, running: () => 0, batchSize: () => 0 });
    const file = await axisFile();
    let monitor: ProjectionMonitor | undefined;
    let observe: ((v: number) => void) | undefined;
    const service = createInferenceService({
      backend,
      wireDtype: Dtype.DTYPE_F32,
      metrics,
      log: pino({ level: 'silent' }),
      afterLoad: (info) => {
        monitor = ProjectionMonitor.load(file, info, 0.01);
        observe = monitorMetrics(registry, info.model, monitor.buckets, monitor.threshold);
      },
      onActivation: (a, layers) => {
        const p = monitor!.project(a, layers);
        if (p !== undefined) observe!(p);
      },
    });
    expect(await service.load()).toBe(true);
    const row = axisData.subarray(3 * d, 4 * d);
    const norm = Math.hypot(...row);
    const projections: number[] = [];
    for (let i = 0; i < 12; i++) {
      const r = await service.generate({ itemId: `r/chef/k${i}`, messages: [{ role: 'user', content: `question ${i}` }], sampling, seed: i, layers: [], textOnly: false, cappingExperiment: '' });
      const a = decodeTensor(r.activation, 'a').data;
      projections.push(row.reduce((s, x, k) => s + x * a[3 * d + k], 0) / norm);
    }
    // A measured answer with only layers 1 and 3: read from its second row; with only layer 1: not counted.
    const m = await service.extract({ itemId: 'r/chef/m', messages: [{ role: 'user', content: 'q' }, { role: 'assistant', content: 'an answer' }], layers: [1, 3], responseTokenIds: [], enableThinking: false, cappingExperiment: '' });
    const ma = decodeTensor(m.activation, 'm').data;
    projections.push(row.reduce((s, x, k) => s + x * ma[d + k], 0) / norm);
    await service.extract({ itemId: 'r/chef/n', messages: [{ role: 'user', content: 'q' }, { role: 'assistant', content: 'another' }], layers: [1], responseTokenIds: [], enableThinking: false, cappingExperiment: '' });
    const text = await registry.metrics();
    const value = (name: string) => Number(new RegExp(`^${name}\\{model_name="synthetic-tiny"\\} (\\S+)$`, 'm').exec(text)![1]);
    expect(value('axis_inference_monitored_answers_total')).toBe(13);
    const below = projections.filter((p) => p < 0.01).length;
    expect(below).toBeGreaterThan(0);
    expect(below).toBeLessThan(13);
    expect(value('axis_inference_answers_below_threshold_total')).toBe(below);
    expect(value('axis_inference_answer_projection_sum')).toBeCloseTo(projections.reduce((a, b) => a + b, 0), 5);
    expect(value('axis_inference_monitor_threshold')).toBe(0.01);
  });

  it('takes the axis run\'s default answers\' 25th percentile for the threshold, and its percentiles for the buckets', async () => {
    const info = { model: 'synthetic-tiny', numLayers: L, hiddenSize: d } as Parameters<typeof ProjectionMonitor.load>[1];
    const file = await axisFile({ answer_percentiles: JSON.stringify({ layer: 3, levels: [1, 5, 25, 50, 75, 95, 99], groups: { default: [-1, 0, 0.5, 1, 1.5, 2, 3], role_play: [-4, -3, -2, -1, 0, 1, 2] } }) });
    const m = ProjectionMonitor.load(file, info);
    expect(m.threshold).toBe(0.5);
    expect(m.buckets).toContain(0.5);
    expect(Math.min(...m.buckets)).toBeLessThanOrEqual(-4);
    expect(Math.max(...m.buckets)).toBeGreaterThanOrEqual(3);
    expect(ProjectionMonitor.load(file, info, -2).threshold).toBe(-2);
    // Percentiles of another layer say nothing of this one.
    const other = await axisFile({ answer_percentiles: JSON.stringify({ layer: 2, groups: { default: [0, 0, 7, 0, 0, 0, 0] } }) });
    expect(ProjectionMonitor.load(other, info).threshold).toBeUndefined();
  });

  it('refuses an axis that does not fit the model, naming the file and the shapes; the replica stays not ready and says why', async () => {
    const info = { model: 'synthetic-tiny', numLayers: L, hiddenSize: d } as Parameters<typeof ProjectionMonitor.load>[1];
    const wide = await axisFile({}, new Float32Array(L * (d + 1)), [L, d + 1]);
    expect(() => ProjectionMonitor.load(wide, info)).toThrow(`--monitor-axis ${wide}: its axis is [${L},${d + 1}], rows of ${d + 1}, but synthetic-tiny has hidden size ${d}`);
    const short = await axisFile({}, new Float32Array(2 * d), [2, d]);
    expect(() => ProjectionMonitor.load(short, info)).toThrow(`its axis has 2 rows, but synthetic-tiny has ${L} layers`);
    const subset = await axisFile({ layers: '0,1' }, new Float32Array(2 * d).fill(1), [2, d]);
    expect(() => ProjectionMonitor.load(subset, info)).toThrow("no row for layer 3, synthetic-tiny's target layer (its rows: 0, 1)");
    expect(() => ProjectionMonitor.load('/no/such/axis.safetensors', info)).toThrow('--monitor-axis /no/such/axis.safetensors: cannot read it (ENOENT)');
    const backend = new SyntheticBackend({ model: 'synthetic-tiny', numLayers: L, hidden: d, tokensPerSecond: 0, itemsPerSecond: 0, capacity: 4, supportsSystemPrompt: true });
    const service = createInferenceService({ backend, wireDtype: Dtype.DTYPE_F32, metrics: inferenceMetrics(new Registry(), { inFlight: () => 0, running: () => 0, batchSize: () => 0 }), log: pino({ level: 'silent' }), afterLoad: (i) => void ProjectionMonitor.load(wide, i) });
    expect(await service.load()).toBe(false);
    expect(() => service.modelInfo()).toThrow(`model not loaded: --monitor-axis ${wide}`);
  });
});
