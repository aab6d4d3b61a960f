import * as fs from 'node:fs';
import * as path from 'node:path';
import { syntheticActivation } from '../../services/inference/synthetic';
import { isDefaultRole } from '../../services/shared/names';
import { readSafetensors } from '../../services/shared/safetensors';

export interface RunFiles {
  responses: Record<string, any[]>;
  scores: Record<string, Record<string, number>>;
}

export function readRunFiles(runDir: string): RunFiles {
  const responses: Record<string, any[]> = {};
  const scores: Record<string, Record<string, number>> = {};
  for (const f of fs.readdirSync(path.join(runDir, 'responses'))) {
    const role = f.replace(/\.jsonl$/, '');
    responses[role] = fs.readFileSync(path.join(runDir, 'responses', f), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  }
  for (const f of fs.readdirSync(path.join(runDir, 'scores'))) {
    scores[f.replace(/\.json$/, '')] = JSON.parse(fs.readFileSync(path.join(runDir, 'scores', f), 'utf8'));
  }
  return { responses, scores };
}

/**
 * The axis recomputed independently of the services: every item's activation from the
 * synthetic backend's pure function of its conversation (as written in responses/), the
 * scores from scores/, then DESIGN.md's formulas in float64.
 */
export function recomputeAxis(files: RunFiles, numLayers: number, hidden: number, minCount: number): { axis: Float64Array; kept: string[] } {
  const size = numLayers * hidden;
  const roleVectors: Float64Array[] = [];
  const defaultVectors: Float64Array[] = [];
  const kept: string[] = [];
  for (const [role, lines] of Object.entries(files.responses).sort()) {
    const sum = new Float64Array(size);
    let n = 0;
    for (const line of lines) {
      const key = `pos_p${line.prompt_index}_q${line.question_index}`;
      if (!isDefaultRole(role) && files.scores[role]?.[key] !== 3) continue;
      const a = syntheticActivation(line.conversation, numLayers, hidden).data;
      for (let i = 0; i < size; i++) sum[i] += a[i];
      n++;
    }
    if (isDefaultRole(role)) defaultVectors.push(sum.map((v) => v / n));
    else if (n >= minCount) {
      roleVectors.push(sum.map((v) => v / n));
      kept.push(role);
    }
  }
  const axis = new Float64Array(size);
  for (let i = 0; i < size; i++) {
    axis[i] = defaultVectors.reduce((s, v) => s + v[i], 0) / defaultVectors.length - roleVectors.reduce((s, v) => s + v[i], 0) / roleVectors.length;
  }
  return { axis, kept };
}

/** max |a - b| / max |b| for each layer. */
export function relativeErrorPerLayer(a: ArrayLike<number>, b: ArrayLike<number>, numLayers: number, hidden: number): number[] {
  const out: number[] = [];
  for (let l = 0; l < numLayers; l++) {
    let diff = 0;
    let ref = 0;
    for (let i = l * hidden; i < (l + 1) * hidden; i++) {
      diff = Math.max(diff, Math.abs(a[i] - b[i]));
      ref = Math.max(ref, Math.abs(b[i]));
    }
    out.push(diff / ref);
  }
  return out;
}

export async function readAxis(runDir: string) {
  return readSafetensors(path.join(runDir, 'axis.safetensors'));
}

/** Distance in float32 units in the last place. */
export function ulpDistance(a: number, b: number): number {
  const f = new Float32Array([a, b]);
  const i = new Int32Array(f.buffer);
  const ord = (x: number) => (x < 0 ? 0x80000000 - x : x);
  return Math.abs(ord(i[0]) - ord(i[1]));
}
