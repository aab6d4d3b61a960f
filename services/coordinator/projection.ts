import * as grpc from '@grpc/grpc-js';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Dtype } from '../../gen/assistant_axis/v1/common';
import { CoordinatorServiceProjectConversationRequest, CoordinatorServiceProjectConversationResponse, RunState } from '../../gen/assistant_axis/v1/coordinator';
import type { ProjectConversationResponse } from '../../gen/assistant_axis/v1/inference';
import { axisFileLayers } from '../shared/projection';
import { invalidArgument, RpcError } from '../shared/rpc';
import { encodeTensor } from '../shared/tensor';
import { confinedPath, readAxisFile } from './confine';
import type { RunManager } from './runManager';
import { checkRunName } from './runSpec';
import type { InferencePool } from './upstreams';

/** A conversation of tens of thousands of tokens is one prefill pass: minutes on a CPU. */
const PROJECT_DEADLINE_MS = 30 * 60_000;

/** The axis a projection reads: its rows, the model layer of each, and the model it was computed for. */
interface NamedAxis {
  data: Float32Array;
  rows: number;
  hidden: number;
  layers: number[];
  model: string;
  source: string;
}

/**
 * ProjectConversation: the axis of a finished run (`axis_run`) or of a safetensors file under
 * the data roots (`axis_file`), the layers asked for, and one inference replica of the model,
 * which projects the conversation in one pass.
 */
export async function projectConversation(req: CoordinatorServiceProjectConversationRequest, deps: { runs: RunManager; inference: InferencePool; dataRoots: string[] }): Promise<CoordinatorServiceProjectConversationResponse> {
  if (!req.axisRun === !req.axisFile) throw invalidArgument('axis_run, axis_file: name exactly one (a finished run, or a safetensors file with a tensor "axis")');
  const axis = req.axisRun ? await runAxis(req.axisRun, deps.runs) : await fileAxis(req.axisFile, deps.dataRoots);
  const layers = req.layers.length ? req.layers : axis.layers;
  const rows = layers.map((l) => {
    const r = axis.layers.indexOf(l);
    if (r < 0) throw invalidArgument(`layers: the axis (${axis.source}) has no row for layer ${l} (its layers: ${axis.layers.join(', ')})`);
    return r;
  });
  const picked = new Float32Array(rows.length * axis.hidden);
  rows.forEach((r, i) => picked.set(axis.data.subarray(r * axis.hidden, (r + 1) * axis.hidden), i * axis.hidden));
  const model = req.model || axis.model || onlyModel(deps.inference);
  const replicas = deps.inference.serving(model);
  if (replicas.length === 0) throw new RpcError(grpc.status.FAILED_PRECONDITION, `model: no inference replica serves ${JSON.stringify(model)}${axis.model && !req.model ? ` (the model of ${axis.source})` : ''}`);
  const replica = replicas.reduce((a, b) => (b.inFlight < a.inFlight ? b : a));
  const res = await new Promise<ProjectConversationResponse>((resolve, reject) =>
    replica.client.projectConversation(
      { messages: req.messages, axis: encodeTensor({ shape: [rows.length, axis.hidden], data: picked }, Dtype.DTYPE_F32), axisLayers: layers, tokenProjections: req.tokenProjections, enableThinking: req.enableThinking, chunkTokens: 0 },
      new grpc.Metadata(),
      { deadline: new Date(Date.now() + PROJECT_DEADLINE_MS) },
      (err, r) => (err ? reject(new RpcError(err.code, `inference ${replica.address}: ${err.details || err.message}`)) : resolve(r)),
    ),
  );
  return { model, turns: res.turns, layers: res.layers, targetLayer: res.targetLayer, totalTokens: res.totalTokens, bands: req.axisRun ? runBands(deps.runs.runDir(req.axisRun), res.targetLayer) : undefined };
}

/** Where the axis run's default and role-play answers lie at `layer` (its report's percentiles), when it has them. */
function runBands(runDir: string, layer: number): CoordinatorServiceProjectConversationResponse['bands'] {
  try {
    const report = JSON.parse(fs.readFileSync(path.join(runDir, 'report.json'), 'utf8')) as { answer_projections?: { group: string; by_layer: number[][] }[] };
    const at = (group: string) => report.answer_projections?.find((a) => a.group === group)?.by_layer[layer] ?? [];
    const bands = { layer, defaultAnswers: at('default'), rolePlayAnswers: at('role_play') };
    return bands.defaultAnswers.length || bands.rolePlayAnswers.length ? bands : undefined;
  } catch {
    return undefined;
  }
}

/** A finished run's axis.safetensors and its model (from the manifest). */
async function runAxis(name: string, runs: RunManager): Promise<NamedAxis> {
  checkRunName(name);
  const run = runs.get(name);
  if (run.state !== RunState.RUN_STATE_SUCCEEDED) throw new RpcError(grpc.status.FAILED_PRECONDITION, `axis_run: run ${JSON.stringify(name)} is ${RunState[run.state].replace('RUN_STATE_', '').toLowerCase()}, not finished: it has no axis yet`);
  const file = path.join(runs.runDir(name), 'axis.safetensors');
  return { ...(await axisOf(file, 'axis_run')), model: run.model, source: `run ${name}` };
}

async function fileAxis(file: string, roots: string[]): Promise<NamedAxis> {
  const resolved = await confinedPath('axis_file', file, roots);
  return { ...(await axisOf(resolved, 'axis_file')), model: '', source: resolved };
}

async function axisOf(file: string, field: string): Promise<Omit<NamedAxis, 'model' | 'source'>> {
  if (!fs.existsSync(file)) throw invalidArgument(`${field}: ${file}: no such file`);
  let read;
  try {
    read = await readAxisFile(file);
  } catch (err) {
    throw invalidArgument(`${field}: ${file}: ${(err as Error).message}`);
  }
  const axis = read.tensors.axis;
  if (!axis || axis.shape.length !== 2) throw invalidArgument(`${field}: ${file}: no [layers, hidden] tensor named "axis"`);
  const [rows, hidden] = axis.shape;
  // A run that kept a subset of layers names them (axis.safetensors' metadata "layers").
  const named = read.metadata.layers;
  const layers = axisFileLayers(named, rows);
  if (layers.length !== rows || layers.some((l) => !Number.isInteger(l) || l < 0)) throw invalidArgument(`${field}: ${file}: its "layers" metadata (${named}) does not name its ${rows} rows`);
  return { data: axis.data, rows, hidden, layers };
}

function onlyModel(pool: InferencePool): string {
  const models = [...new Set(pool.replicas.map((r) => r.info?.model).filter((m): m is string => !!m))];
  if (models.length !== 1) throw invalidArgument(`model: required (${models.length ? `the replicas serve ${models.join(', ')}` : 'no inference replica is ready'})`);
  return models[0];
}
