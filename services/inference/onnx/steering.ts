import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { decodeSafetensors } from '../../shared/safetensors';

/**
 * Interventions on the residual stream (docs/CONCEPTS.md, "Capping"), as the graph applies them
 * after decoder block `layer` (STEERING_INPUTS): h <- h - unit (beta relu(<h, unit> - tau) +
 * gamma <h, unit>) + add.
 */
export interface LayerIntervention {
  layer: number;
  /** [hidden] unit vector (zeros for a plain addition). */
  unit: Float32Array;
  /** [hidden] added after the cap or ablation (zeros when none). */
  add: Float32Array;
  beta: number;
  tau: number;
  gamma: number;
}

/** One experiment of a capping config, resolved to its interventions, at most one per layer. */
export interface Steering {
  id: string;
  layers: Map<number, LayerIntervention>;
}

/** A capping config's JSON (PREFIX.json beside PREFIX.safetensors, which holds each vector [hidden] by name). */
export interface CappingConfigFile {
  format?: string;
  model?: string;
  /** Each named vector's layer (its values are the safetensors tensor of the same name). */
  vectors: Record<string, { layer: number }>;
  experiments: { id: string; interventions: InterventionSpec[] }[];
}

/**
 * One intervention: a cap (`cap`: h <- h - v_hat max(<h, v_hat> - cap, 0)), an addition
 * (`add`: h <- h + add v), or an ablation (`ablate: true`: h <- h - <h, v_hat> v_hat + add v).
 * A cap may be "inf" (no effect).
 */
export interface InterventionSpec {
  vector: string;
  cap?: number | string;
  add?: number;
  ablate?: boolean;
}

export const CAPPING_FORMAT = 'assistant-axis-capping/1';

/** A capping config that cannot be used with this model: the message names the file, the field and what is wrong. */
export class SteeringError extends Error {}

/** A loaded capping config: its vectors [hidden] by name with their layers, and its experiments. */
export class CappingConfig {
  private constructor(
    readonly file: string,
    /** sha256 of PREFIX.json and PREFIX.safetensors together: which config a run used. */
    readonly sha256: string,
    readonly model: string,
    readonly vectors: Map<string, { layer: number; values: Float32Array }>,
    readonly experiments: Map<string, InterventionSpec[]>,
  ) {}

  /** Reads `PREFIX.json` and `PREFIX.safetensors` (`file` is either, or the prefix), checked against the model's layers and width. */
  static load(file: string, model: { numLayers: number; hidden: number }): CappingConfig {
    const prefix = file.replace(/\.(json|safetensors)$/, '');
    const jsonFile = `${prefix}.json`;
    const tensorFile = `${prefix}.safetensors`;
    let spec: CappingConfigFile;
    try {
      spec = JSON.parse(fs.readFileSync(jsonFile, 'utf8')) as CappingConfigFile;
    } catch (err) {
      throw new SteeringError(`${jsonFile}: ${(err as NodeJS.ErrnoException).code ? `cannot read it (${(err as NodeJS.ErrnoException).code})` : `not valid JSON (${(err as Error).message})`}`);
    }
    if (spec.format !== undefined && spec.format !== CAPPING_FORMAT) throw new SteeringError(`${jsonFile}: format ${JSON.stringify(spec.format)} is not ${CAPPING_FORMAT}`);
    if (!spec.vectors || typeof spec.vectors !== 'object' || !Array.isArray(spec.experiments)) throw new SteeringError(`${jsonFile}: needs "vectors" (name -> {layer}) and "experiments" ([{id, interventions}])`);
    let tensors;
    try {
      tensors = decodeSafetensors(fs.readFileSync(tensorFile), tensorFile).tensors;
    } catch (err) {
      throw new SteeringError(`${tensorFile}: ${(err as NodeJS.ErrnoException).code ? `cannot read it (${(err as NodeJS.ErrnoException).code})` : (err as Error).message}`);
    }
    const vectors = new Map<string, { layer: number; values: Float32Array }>();
    for (const [name, v] of Object.entries(spec.vectors)) {
      if (!(Number.isInteger(v?.layer) && v.layer >= 0 && v.layer < model.numLayers)) throw new SteeringError(`${jsonFile}: vectors.${name}.layer: ${v?.layer} is not a layer of the model (0..${model.numLayers - 1})`);
      const t = tensors[name];
      if (!t) throw new SteeringError(`${tensorFile}: no tensor ${JSON.stringify(name)} (vectors.${name} in ${jsonFile})`);
      if (t.data.length !== model.hidden) throw new SteeringError(`${tensorFile}: ${name} has shape [${t.shape}], not [${model.hidden}] (the model's hidden size)`);
      const bad = t.data.findIndex((x) => !Number.isFinite(x));
      if (bad >= 0) throw new SteeringError(`${tensorFile}: ${name}[${bad}] is not finite`);
      vectors.set(name, { layer: v.layer, values: t.data });
    }
    const experiments = new Map<string, InterventionSpec[]>();
    spec.experiments.forEach((e, i) => {
      if (typeof e?.id !== 'string' || !e.id) throw new SteeringError(`${jsonFile}: experiments[${i}].id: a name is required`);
      if (experiments.has(e.id)) throw new SteeringError(`${jsonFile}: experiments[${i}].id: ${JSON.stringify(e.id)} is there twice`);
      if (!Array.isArray(e.interventions)) throw new SteeringError(`${jsonFile}: experiments[${i}].interventions must be a list`);
      experiments.set(e.id, e.interventions);
    });
    const digest = createHash('sha256').update(fs.readFileSync(jsonFile)).update(fs.readFileSync(tensorFile)).digest('hex');
    const config = new CappingConfig(jsonFile, digest, spec.model ?? '', vectors, experiments);
    // Every experiment resolves now, so that a bad one is refused at load and not at its first item.
    for (const id of experiments.keys()) config.experiment(id);
    return config;
  }

  /** An experiment's interventions by layer; "none" is no experiment. */
  experiment(id: string): Steering | undefined {
    if (id === 'none') return undefined;
    const specs = this.experiments.get(id);
    if (!specs) throw new SteeringError(`experiment: ${JSON.stringify(id)} is not in ${this.file} (it has ${[...this.experiments.keys()].join(', ') || 'none'})`);
    const layers = new Map<number, LayerIntervention>();
    specs.forEach((s, k) => {
      const where = `${this.file}: experiment ${id}, interventions[${k}]`;
      const v = this.vectors.get(s?.vector);
      if (!v) throw new SteeringError(`${where}.vector: ${JSON.stringify(s?.vector)} is not one of its vectors`);
      if (layers.has(v.layer)) throw new SteeringError(`${where}: a second intervention at layer ${v.layer} (one per layer)`);
      const norm = Math.hypot(...v.values);
      const add = s.add ?? 0;
      if (!Number.isFinite(add)) throw new SteeringError(`${where}.add: must be a number, got ${s.add}`);
      const scaled = Float32Array.from(v.values, (x) => x * add);
      if (s.cap !== undefined) {
        const cap = typeof s.cap === 'string' && /^\+?(inf|infinity)$/i.test(s.cap) ? Infinity : s.cap;
        if (typeof cap !== 'number' || Number.isNaN(cap) || cap === -Infinity) throw new SteeringError(`${where}.cap: must be a number or "inf", got ${JSON.stringify(s.cap)}`);
        if (!(norm > 0)) throw new SteeringError(`${where}.vector: ${s.vector} is zero: nothing to cap along`);
        if (s.ablate || s.add !== undefined) throw new SteeringError(`${where}: a cap takes neither ablate nor add`);
        layers.set(v.layer, { layer: v.layer, unit: Float32Array.from(v.values, (x) => x / norm), add: new Float32Array(v.values.length), beta: 1, tau: cap, gamma: 0 });
      } else if (s.ablate) {
        if (!(norm > 0)) throw new SteeringError(`${where}.vector: ${s.vector} is zero: nothing to ablate along`);
        layers.set(v.layer, { layer: v.layer, unit: Float32Array.from(v.values, (x) => x / norm), add: scaled, beta: 0, tau: 0, gamma: 1 });
      } else if (s.add !== undefined) {
        layers.set(v.layer, { layer: v.layer, unit: new Float32Array(v.values.length), add: scaled, beta: 0, tau: 0, gamma: 0 });
      } else {
        throw new SteeringError(`${where}: say cap, add or ablate`);
      }
    });
    return { id, layers };
  }
}

/** A run's feeds of STEERING_INPUTS: [layers, rows, hidden] unit and add, [layers, rows, 3] params. */
export interface SteeringFeeds {
  unit: Float32Array;
  add: Float32Array;
  params: Float32Array;
}

/**
 * The feeds of a run over `rows` (each row's experiment, or none) for the layers [first, end)
 * of the graph; undefined when no row steers (the graph then skips it all).
 */
export function steeringFeeds(rows: (Steering | undefined)[], [first, end]: [number, number], hidden: number): SteeringFeeds | undefined {
  if (!rows.some((r) => r && [...r.layers.keys()].some((l) => l >= first && l < end))) return undefined;
  const L = end - first;
  const B = rows.length;
  const unit = new Float32Array(L * B * hidden);
  const add = new Float32Array(L * B * hidden);
  const params = new Float32Array(L * B * 3);
  rows.forEach((r, b) => {
    if (!r) return;
    for (const [layer, x] of r.layers) {
      if (layer < first || layer >= end) continue;
      const at = (layer - first) * B + b;
      unit.set(x.unit, at * hidden);
      add.set(x.add, at * hidden);
      params.set([x.beta, x.tau, x.gamma], at * 3);
    }
  });
  return { unit, add, params };
}

/** The feeds of a run without interventions: one row of zeros per layer (the graph skips them), made once per shape. */
export function idleSteering(layers: number, hidden: number): SteeringFeeds {
  const key = `${layers}x${hidden}`;
  let idle = idleCache.get(key);
  if (!idle) idleCache.set(key, (idle = { unit: new Float32Array(layers * hidden), add: new Float32Array(layers * hidden), params: new Float32Array(layers * 3) }));
  return idle;
}
const idleCache = new Map<string, SteeringFeeds>();
