import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { LoadedModel } from '../../services/inference/onnx/model';
import type { SequenceJob, SequenceResult } from '../../services/inference/onnx/runner';
import { SlotRunner } from '../../services/inference/onnx/slotEngine';
import { CappingConfig, SteeringError } from '../../services/inference/onnx/steering';
import { StepSession } from '../../services/inference/onnx/stepSession';
import { buildModel } from '../../services/model/build';
import { writeTinyCheckpoint } from '../../services/model/tiny';
import { readSafetensors, writeSafetensors } from '../../services/shared/safetensors';
import { promisify } from 'node:util';
import { ROOT } from '../kit/stack';
import { tempDir } from '../kit/files';
import { referenceForward, relativeError } from '../reference/forward';

/**
 * Interventions on the residual stream in the step graph (activation capping, addition,
 * ablation), against a float64 forward pass with the reference's formulas written out here:
 * cap h <- h - v_hat max(<h, v_hat> - tau, 0); addition h <- h + c v; ablation
 * h <- h - <h, v_hat> v_hat + c v, on the output of block l before block l + 1 reads it.
 */
type Spec = { layer: number; vector: number[]; cap?: number | string; add?: number; ablate?: boolean };

function applyReference(specs: Spec[]) {
  return (layer: number, h: Float64Array, S: number, D: number) => {
    for (const s of specs.filter((x) => x.layer === layer)) {
      const n = Math.hypot(...s.vector);
      const unit = s.vector.map((x) => x / n);
      for (let p = 0; p < S; p++) {
        let dot = 0;
        for (let i = 0; i < D; i++) dot += h[p * D + i] * unit[i];
        const cap = s.cap === undefined ? undefined : Number(s.cap === 'inf' ? Infinity : s.cap);
        const take = cap !== undefined ? Math.max(dot - cap, 0) : s.ablate ? dot : 0;
        for (let i = 0; i < D; i++) h[p * D + i] += -take * unit[i] + (s.add ?? 0) * s.vector[i];
      }
    }
  };
}

async function writeConfig(dir: string, hidden: number, experiments: Record<string, Spec[]>): Promise<string> {
  const prefix = path.join(dir, 'capping');
  const vectors: Record<string, { layer: number }> = {};
  const tensors: Record<string, { shape: number[]; data: Float32Array }> = {};
  const list = Object.entries(experiments).map(([id, specs]) => ({
    id,
    interventions: specs.map((s, k) => {
      const name = `${id}_v${k}`;
      vectors[name] = { layer: s.layer };
      tensors[name] = { shape: [hidden], data: Float32Array.from(s.vector) };
      return { vector: name, ...(s.cap !== undefined ? { cap: s.cap } : {}), ...(s.add !== undefined ? { add: s.add } : {}), ...(s.ablate ? { ablate: true } : {}) };
    }),
  }));
  fs.writeFileSync(`${prefix}.json`, JSON.stringify({ format: 'assistant-axis-capping/1', vectors, experiments: list }));
  await writeSafetensors(`${prefix}.safetensors`, tensors);
  return prefix;
}

const IDS = [5, 17, 42, 99, 7, 256, 31, 8, 64, 12, 3, 77, 150, 9, 21, 44, 88, 13];

describe.each(['llama', 'gemma2'] as const)('interventions in the step graph on %s', (arch) => {
  let checkpoint: string;
  let modelDir: string;
  let dir: string;
  let session: StepSession;
  let plain: Float32Array[];
  let plainLogits: Float32Array;
  beforeAll(async () => {
    dir = tempDir(`steer-${arch}`);
    checkpoint = path.join(dir, 'checkpoint');
    modelDir = path.join(dir, 'model');
    await writeTinyCheckpoint({ arch, out: checkpoint, seed: 4, merges: 300 });
    await buildModel({ hf: checkpoint, out: modelDir, capture: true });
    session = await StepSession.load(modelDir, { slots: 3, slotLength: 64 });
    const out = await session.prefill(0, IDS, { logits: 'all' });
    session.reset(0);
    plain = out.hidden;
    plainLogits = out.logits;
  }, 120_000);
  afterAll(async () => session?.close());

  const D = () => session.metadata.hidden_size;
  const vector = (seed: number) => Array.from({ length: D() }, (_, i) => Math.sin(seed * 13 + i * 0.7));
  const projections = (h: Float32Array | Float64Array, v: number[]) => {
    const n = Math.hypot(...v);
    return Array.from({ length: IDS.length }, (_, p) => v.reduce((s, x, i) => s + (x / n) * h[p * D() + i], 0));
  };

  it('caps layers 1 and 2 as a float64 pass does (<= 1e-4): at most tau there, tau where it was above, unchanged below and before', async () => {
    const v1 = vector(1);
    const v2 = vector(2);
    // Caps at the median of the unsteered projections: about half the positions are capped.
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
    const specs: Spec[] = [
      { layer: 1, vector: v1, cap: median(projections(plain[1], v1)) },
      { layer: 2, vector: v2, cap: median(projections(plain[2], v2)) },
    ];
    const config = CappingConfig.load(await writeConfig(dir, D(), { band: specs }), { numLayers: 4, hidden: D() });
    const out = await session.prefill(0, IDS, { logits: 'all', steer: config.experiment('band') });
    session.reset(0);
    const ref = referenceForward(checkpoint, IDS, {}, applyReference(specs));
    for (let l = 0; l < 4; l++) expect(relativeError(out.hidden[l], ref.hidden[l])).toBeLessThanOrEqual(1e-4);
    expect(relativeError(out.logits, ref.logits)).toBeLessThanOrEqual(1e-4);
    // onnxruntime-node's JavaScript API (the stock runtime) feeds them alike.
    const stock = await StepSession.load(modelDir, { slots: 1, slotLength: 64, runtime: 'stock' });
    const viaStock = await stock.prefill(0, IDS, { logits: 'all', steer: config.experiment('band') });
    await stock.close();
    for (let l = 0; l < 4; l++) expect(relativeError(viaStock.hidden[l], out.hidden[l])).toBeLessThanOrEqual(1e-6);
    // Layer 0 is before the band: exactly as without.
    expect(Array.from(out.hidden[0])).toEqual(Array.from(plain[0]));
    // At layer 1: the cap holds, and positions above it sit on it; those below are untouched.
    const before = projections(plain[1], v1);
    const after = projections(out.hidden[1], v1);
    const tau = specs[0].cap as number;
    let capped = 0;
    before.forEach((b, p) => {
      expect(after[p]).toBeLessThanOrEqual(tau + 1e-4);
      if (b > tau) {
        capped++;
        expect(Math.abs(after[p] - tau)).toBeLessThanOrEqual(1e-4);
      } else {
        for (let i = 0; i < D(); i++) expect(out.hidden[1][p * D() + i]).toBeCloseTo(plain[1][p * D() + i], 6);
      }
    });
    expect(capped).toBeGreaterThan(3);
  });

  it('adds and ablates as a float64 pass does (<= 1e-4)', async () => {
    const specs: Record<string, Spec[]> = {
      addition: [{ layer: 1, vector: vector(3), add: 2.5 }],
      ablation: [{ layer: 2, vector: vector(4), ablate: true, add: 0.5 }],
    };
    const config = CappingConfig.load(await writeConfig(dir, D(), specs), { numLayers: 4, hidden: D() });
    for (const [id, list] of Object.entries(specs)) {
      const out = await session.prefill(0, IDS, { logits: 'all', steer: config.experiment(id) });
      session.reset(0);
      const ref = referenceForward(checkpoint, IDS, {}, applyReference(list));
      for (let l = 0; l < 4; l++) expect(relativeError(out.hidden[l], ref.hidden[l])).toBeLessThanOrEqual(1e-4);
    }
    // Ablation leaves nothing along v but the added part: <h, v_hat> = 0.5 |v| at every position.
    const out = await session.prefill(0, IDS, { logits: 'none', steer: config.experiment('ablation') });
    session.reset(0);
    const n = Math.hypot(...vector(4));
    for (const p of projections(out.hidden[2], vector(4))) expect(p).toBeCloseTo(0.5 * n, 3);
  });

  it('axis-model hidden applies an experiment in its forward pass, as the engine does', async () => {
    const specs: Spec[] = [{ layer: 2, vector: vector(9), cap: 0 }];
    const prefix = await writeConfig(dir, D(), { cli: specs });
    const out = path.join(dir, 'hidden-capped.safetensors');
    const run = await promisify(execFile)(process.execPath, [path.join(ROOT, 'dist/services/cli/axisModel.js'), 'hidden', '--model', modelDir, '--ids', IDS.join(','), '--out', out, '--capping', prefix, '--experiment', 'cli']);
    expect(run.stdout).toContain(`with cli of ${prefix}`);
    const written = (await readSafetensors(out)).tensors.hidden_states.data;
    const engine = await session.prefill(0, IDS, { logits: 'none', steer: CappingConfig.load(prefix, { numLayers: 4, hidden: D() }).experiment('cli') });
    session.reset(0);
    engine.hidden.forEach((h, l) => expect(Array.from(written.subarray(l * h.length, (l + 1) * h.length))).toEqual(Array.from(h)));
    const refused = await promisify(execFile)(process.execPath, [path.join(ROOT, 'dist/services/cli/axisModel.js'), 'hidden', '--model', modelDir, '--ids', '1,2', '--out', out, '--capping', prefix, '--experiment', 'other']).catch((e) => e);
    expect(refused.stderr).toContain(`experiment: "other" is not in ${prefix}.json (it has cli)`);
  });

  it('changes nothing, exactly, with every cap at +infinity or no experiment', async () => {
    const config = CappingConfig.load(await writeConfig(dir, D(), { open: [0, 1, 2, 3].map((layer) => ({ layer, vector: vector(layer + 5), cap: 'inf' })) }), { numLayers: 4, hidden: D() });
    for (const steer of [config.experiment('open'), config.experiment('none')]) {
      const out = await session.prefill(0, IDS, { logits: 'all', steer });
      session.reset(0);
      out.hidden.forEach((h, l) => expect(Array.from(h)).toEqual(Array.from(plain[l])));
      expect(Array.from(out.logits)).toEqual(Array.from(plainLogits));
    }
  });
});

describe('interventions per slot in the slots engine', () => {
  it('gives each item, among neighbours running other experiments or none, what it gets alone: text and activation', async () => {
    const dir = tempDir('steer-slots');
    const checkpoint = path.join(dir, 'checkpoint');
    const modelDir = path.join(dir, 'model');
    await writeTinyCheckpoint({ arch: 'llama', out: checkpoint, seed: 6, merges: 300 });
    await buildModel({ hf: checkpoint, out: modelDir, capture: true });
    const model = await LoadedModel.load(modelDir, { decode: 'slots', slots: { slots: 4, slotLength: 96, prefillChunk: 16, policy: 'fifo' } });
    const D = model.metadata.hidden_size;
    const v = (seed: number) => Array.from({ length: D }, (_, i) => Math.cos(seed + i * 0.3));
    const config = CappingConfig.load(await writeConfig(dir, D, { low: [{ layer: 1, vector: v(1), cap: -0.5 }, { layer: 2, vector: v(2), cap: 0 }], push: [{ layer: 2, vector: v(3), add: 3 }] }), { numLayers: 4, hidden: D });
    const engine = (model.runner as SlotRunner).engine;
    const job = (k: number, steering?: string): SequenceJob => ({ ids: IDS.slice(0, 8 + k), maxNew: 10 + k, temperature: 0.8, topP: 0.9, uniforms: Float32Array.from({ length: 20 }, (_, i) => ((i * 7 + k * 3) % 10) / 10 + 0.05), steering: steering ? config.experiment(steering) : undefined });
    const kinds = ['low', 'push', undefined, 'low'];
    const alone: SequenceResult[] = [];
    for (let k = 0; k < kinds.length; k++) alone.push(await engine.submit(job(k, kinds[k]), false));
    const together = await Promise.all(kinds.map((s, k) => engine.submit(job(k, s), false)));
    together.forEach((t, k) => {
      expect(t.responseIds).toEqual(alone[k].responseIds);
      expect(relativeError(t.mean, alone[k].mean)).toBeLessThanOrEqual(1e-4);
    });
    // The experiments change the answers (else the test shows nothing).
    const unsteered = await engine.submit(job(0), false);
    expect(relativeError(unsteered.mean, alone[0].mean)).toBeGreaterThan(1e-3);
    await model.close();
  }, 120_000);
});

describe('a capping config that does not fit', () => {
  it('is refused naming the file, the field and what is wrong', async () => {
    const dir = tempDir('steer-bad');
    const hidden = 8;
    const prefix = await writeConfig(dir, hidden, { ok: [{ layer: 1, vector: Array(hidden).fill(1), cap: 0 }] });
    const model = { numLayers: 4, hidden };
    expect(() => CappingConfig.load(prefix, { numLayers: 4, hidden: 9 })).toThrow(`${prefix}.safetensors: ok_v0 has shape [8], not [9] (the model's hidden size)`);
    expect(() => CappingConfig.load(prefix, { numLayers: 1, hidden })).toThrow(`${prefix}.json: vectors.ok_v0.layer: 1 is not a layer of the model (0..0)`);
    expect(() => CappingConfig.load(prefix, model).experiment('nope')).toThrow(`experiment: "nope" is not in ${prefix}.json (it has ok)`);
    const nan = await writeConfig(tempDir('steer-bad'), hidden, { bad: [{ layer: 1, vector: Array(hidden).fill(1), cap: 'nan' }] });
    expect(() => CappingConfig.load(nan, model)).toThrow(new SteeringError(`${nan}.json: experiment bad, interventions[0].cap: must be a number or "inf", got "nan"`));
    expect(() => CappingConfig.load(path.join(dir, 'missing'), model)).toThrow(`${path.join(dir, 'missing')}.json: cannot read it (ENOENT)`);
  });
});
