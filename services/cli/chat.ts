import OpenAI from 'openai';
import * as readline from 'node:readline';
import type { Readable, Writable } from 'node:stream';

export interface ChatOptions {
  /** The endpoint's base URL, e.g. http://127.0.0.1:8000/v1. */
  url: string;
  token: string;
  /** Empty: the only model the endpoint lists. */
  model?: string;
  /** An experiment of the replica's capping config, or "none"; undefined: the replica's default. */
  experiment?: string;
  seed?: number;
  maxTokens?: number;
  input: Readable;
  output: Writable;
}

const BAR = 24;

/**
 * A projection as a small bar around zero, scaled by the largest magnitude seen in the session:
 * right of the middle toward the Assistant, left of it away.
 */
export function projectionBar(value: number, scale: number): string {
  const half = BAR / 2;
  const k = Math.round((Math.min(1, Math.abs(value) / (scale || 1)) * half));
  const cells = Array.from({ length: BAR }, (_, i) => (value >= 0 ? i >= half && i < half + k : i < half && i >= half - k) ? '█' : '·');
  return `${cells.slice(0, half).join('')}|${cells.slice(half).join('')}`;
}

/**
 * `axis chat`: a terminal conversation with a replica's chat endpoint, each answer streamed as it
 * comes, then its projection on the replica's monitored axis as a number and a bar.
 * Returns the number of answers.
 */
export async function chat(opts: ChatOptions): Promise<number> {
  const client = new OpenAI({ baseURL: opts.url, apiKey: opts.token, maxRetries: 1 });
  const model = opts.model || (await client.models.list()).data[0]?.id;
  if (!model) throw new Error(`${opts.url} lists no model`);
  const out = (s: string) => opts.output.write(s);
  out(`talking to ${model} at ${opts.url}${opts.experiment ? ` (capping: ${opts.experiment})` : ''}; an empty line ends\n`);
  const messages: OpenAI.ChatCompletionMessageParam[] = [];
  let scale = 0;
  let answers = 0;
  const lines = readline.createInterface({ input: opts.input, terminal: false });
  out('> ');
  for await (const line of lines) {
    if (!line.trim()) break;
    messages.push({ role: 'user', content: line });
    const body = { model, messages, stream: true as const, ...(opts.seed !== undefined ? { seed: opts.seed } : {}), ...(opts.maxTokens ? { max_tokens: opts.maxTokens } : {}), ...(opts.experiment ? { capping_experiment: opts.experiment } : {}) };
    const stream = await client.chat.completions.create(body as OpenAI.ChatCompletionCreateParamsStreaming);
    let text = '';
    let axis: { capping_experiment: string; projection: number | null; layer: number | null } | undefined;
    for await (const chunk of stream) {
      const piece = chunk.choices[0]?.delta.content ?? '';
      text += piece;
      out(piece);
      axis ??= (chunk as unknown as { assistant_axis?: typeof axis }).assistant_axis;
    }
    messages.push({ role: 'assistant', content: text });
    answers++;
    if (axis?.projection !== null && axis?.projection !== undefined) {
      scale = Math.max(scale, Math.abs(axis.projection));
      out(`\n  [projection ${axis.projection.toFixed(3)} at layer ${axis.layer}  ${projectionBar(axis.projection, scale)}  capping: ${axis.capping_experiment}]\n`);
    } else {
      out(`\n  [no projection: the replica monitors no axis (--monitor-axis); capping: ${axis?.capping_experiment ?? 'none'}]\n`);
    }
    out('> ');
  }
  out('\n');
  return answers;
}
