import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ChatMessage } from '../../gen/assistant_axis/v1/common';
import type { CoordinatorServiceProjectConversationRequest, CoordinatorServiceProjectConversationResponse } from '../../gen/assistant_axis/v1/coordinator';
import { writeFileAtomic } from '../shared/files';
import { Band, esc, lineChart } from '../shared/svgCharts';

/** One transcript's projections as projections.json holds them: its own fields (but the conversation), then the turns. */
export interface ProjectedFile {
  [field: string]: unknown;
  projected_with?: string;
  target_layer?: number;
  layers?: number[];
  turns?: { turn: number; message: number; tokens: number; projection: number; layers: number[] }[];
  error?: string;
}

/** Reads a transcript in the reference's format (`conversation`: [{role, content}], other fields kept); throws naming the file and the field. */
export function readTranscript(file: string): { messages: ChatMessage[]; fields: Record<string, unknown> } {
  let parsed: unknown;
  try {
    parsed = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    throw new Error(`${file}: ${(err as NodeJS.ErrnoException).code ? `cannot read it (${(err as NodeJS.ErrnoException).code})` : `not valid JSON (${(err as Error).message})`}`);
  }
  if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) throw new Error(`${file}: not a transcript (a JSON object with a "conversation" list)`);
  const { conversation, ...fields } = parsed as Record<string, unknown>;
  if (!Array.isArray(conversation)) throw new Error(`${file}: "conversation" must be a list of {role, content}`);
  const messages = conversation.map((m, i) => {
    const { role, content } = (m ?? {}) as { role?: unknown; content?: unknown };
    if (typeof role !== 'string' || typeof content !== 'string') throw new Error(`${file}: conversation[${i}] must have a string "role" and "content"`);
    return { role, content };
  });
  return { messages, fields };
}

/**
 * Projects each file's conversation through `project` (the coordinator's ProjectConversation),
 * one file at a time; a file that cannot be read or projected gets an `error` entry and the
 * others go on. Keys are the files' names (their paths where two share a name).
 */
export async function projectFiles(files: string[], request: Omit<CoordinatorServiceProjectConversationRequest, 'messages'>, project: (req: CoordinatorServiceProjectConversationRequest) => Promise<CoordinatorServiceProjectConversationResponse>, onFile: (file: string, entry: ProjectedFile) => void = () => undefined): Promise<{ results: Record<string, ProjectedFile>; bands?: CoordinatorServiceProjectConversationResponse['bands']; failed: number }> {
  const names = files.map((f) => path.basename(f));
  const key = (i: number) => (names.filter((n) => n === names[i]).length > 1 ? files[i] : names[i]);
  const results: Record<string, ProjectedFile> = {};
  let bands: CoordinatorServiceProjectConversationResponse['bands'];
  let failed = 0;
  for (let i = 0; i < files.length; i++) {
    let entry: ProjectedFile;
    try {
      const { messages, fields } = readTranscript(files[i]);
      const res = await project({ ...request, messages });
      const target = res.layers.indexOf(res.targetLayer);
      bands ??= res.bands;
      entry = {
        ...fields,
        projected_with: res.model,
        target_layer: res.targetLayer,
        layers: res.layers,
        turns: res.turns.map((t) => ({ turn: t.turn, message: t.messageIndex, tokens: t.tokens, projection: t.projections[target >= 0 ? target : Math.floor(t.projections.length / 2)] ?? NaN, layers: t.projections })),
      };
    } catch (err) {
      failed++;
      const e = err as { details?: string; message?: string };
      entry = { error: e.details || e.message || String(err) };
    }
    results[key(i)] = entry;
    onFile(files[i], entry);
  }
  return { results, bands, failed };
}

const COLORS = ['#c33', '#258', '#2a7', '#a5c', '#d80', '#555', '#08a', '#a33'];

/** projections.html: each conversation's trajectory at the target layer (turn on x), with where the axis run's own answers lie. */
export function projectionsHtml(results: Record<string, ProjectedFile>, opts: { axis: string; bands?: CoordinatorServiceProjectConversationResponse['bands'] }): string {
  const bands: Band[] = [];
  const b = opts.bands;
  // The middle half (25th to 75th percentile) of each group of the run's answers.
  if (b?.defaultAnswers.length === 7) bands.push({ name: 'default answers (P25..P75)', low: b.defaultAnswers[2], high: b.defaultAnswers[4], color: '#258' });
  if (b?.rolePlayAnswers.length === 7) bands.push({ name: 'role-play answers (P25..P75)', low: b.rolePlayAnswers[2], high: b.rolePlayAnswers[4], color: '#c33' });
  const sections = Object.entries(results).map(([name, r], k) => {
    if (r.error) return `<h2>${esc(name)}</h2><p class="error">Not projected: ${esc(r.error)}</p>`;
    const values = r.turns!.map((t) => t.projection);
    const about = ['model', 'persona', 'domain', 'topic'].filter((f) => typeof r[f] === 'string').map((f) => `${f}: <b>${esc(String(r[f]))}</b>`).join(', ');
    const chart = values.length ? lineChart([{ name, values, color: COLORS[k % COLORS.length] }], 'assistant turn', `projection at layer ${r.target_layer}`, undefined, { bands, point: (i) => `turn ${i}` }) : '<p>No assistant turn.</p>';
    return `<h2>${esc(name)}</h2><p>${about}${about ? '; ' : ''}${values.length} assistant turns, projected with ${esc(String(r.projected_with))}.</p>${chart}`;
  });
  return `<!doctype html><html><head><meta charset="utf-8"><title>Projections on ${esc(opts.axis)}</title><style>body{font-family:sans-serif;max-width:720px;margin:2em auto;color:#222}.error{color:#a00}</style></head><body><h1>Where each conversation lies on the axis</h1><p>Each assistant turn's projection on ${esc(opts.axis)} at the target layer: the mean of its content tokens' hidden states, dotted with the axis's unit row (docs/CONCEPTS.md). Lower is further from the Assistant.${bands.length ? ' Shaded: where the run\'s own answers lie.' : ''}</p>${sections.join('\n')}</body></html>\n`;
}

/** Writes projections.json and projections.html under `out` (created if missing); returns their paths. */
export async function writeProjections(out: string, results: Record<string, ProjectedFile>, opts: { axis: string; bands?: CoordinatorServiceProjectConversationResponse['bands'] }): Promise<string[]> {
  fs.mkdirSync(out, { recursive: true });
  const json = path.join(out, 'projections.json');
  const html = path.join(out, 'projections.html');
  await writeFileAtomic(json, JSON.stringify(results, null, 2) + '\n');
  await writeFileAtomic(html, projectionsHtml(results, opts));
  return [json, html];
}
