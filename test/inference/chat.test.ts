import * as fs from 'node:fs';
import * as path from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import OpenAI from 'openai';
import pino from 'pino';
import { Registry } from 'prom-client';
import { Dtype } from '../../gen/assistant_axis/v1/common';
import { ChatServer } from '../../services/inference/chatServer';
import { chatMetrics, inferenceMetrics } from '../../services/inference/metrics';
import { ProjectionMonitor } from '../../services/inference/monitor';
import { OnnxBackend } from '../../services/inference/onnx/backend';
import { createInferenceService, InferenceService } from '../../services/inference/service';
import { writeSafetensors } from '../../services/shared/safetensors';
import { decodeTensor, encodeTensor } from '../../services/shared/tensor';
import { tempDir } from '../kit/files';
import { tinyLlama } from '../helpers/model';
import { ROOT } from '../kit/stack';
import { execFile } from 'node:child_process';
import { projectionBar } from '../../services/cli/chat';

/**
 * The OpenAI-compatible chat endpoint of an inference replica, through the `openai` npm client
 * (a real HTTP client) on loopback, over the slots engine on a tiny llama with a capping config
 * and a monitored axis: answers equal the engine's for the same conversation and seed, capped
 * or not, streamed or not; the projection field equals a float64 recomputation.
 */
describe('the chat endpoint', () => {
  const TOKEN = 'chat-secret';
  const L = 4;
  const d = 64;
  let service: InferenceService;
  let server: ChatServer;
  let backend: OnnxBackend;
  let client: OpenAI;
  let registry: Registry;
  let model: string;
  let monitor: ProjectionMonitor;
  let modelDir: string;
  const axis = Float32Array.from({ length: L * d }, (_, i) => Math.sin(i * 0.37) + 0.1);
  const messages = [{ role: 'system' as const, content: 'You are a chef.' }, { role: 'user' as const, content: 'What is a roux?' }];

  beforeAll(async () => {
    ({ modelDir } = await tinyLlama());
    const dir = tempDir('chat');
    const capping = path.join(dir, 'capping');
    const v = (l: number) => Float32Array.from({ length: d }, (_, i) => Math.cos(i * (l + 1)));
    fs.writeFileSync(`${capping}.json`, JSON.stringify({ format: 'assistant-axis-capping/1', vectors: { a: { layer: 1 }, b: { layer: 2 } }, experiments: [{ id: 'cap', interventions: [{ vector: 'a', cap: 0 }, { vector: 'b', cap: 0 }] }] }));
    await writeSafetensors(`${capping}.safetensors`, { a: { shape: [d], data: v(1) }, b: { shape: [d], data: v(2) } });
    const axisFile = path.join(dir, 'axis.safetensors');
    await writeSafetensors(axisFile, { axis: { shape: [L, d], data: axis } });
    backend = new OnnxBackend({ model: '', capacity: 8, device: 'cpu', decode: 'slots', maxBatch: 4, maxBatchTokens: 4096, gatherMs: 5, modelDirs: [modelDir], cappingConfig: capping });
    registry = new Registry();
    const metrics = inferenceMetrics(registry, { inFlight: () => 0, running: () => 0, batchSize: () => 0 });
    service = createInferenceService({ backend, wireDtype: Dtype.DTYPE_F32, metrics, log: pino({ level: 'silent' }), afterLoad: (info) => (monitor = ProjectionMonitor.load(axisFile, info)) });
    expect(await service.load()).toBe(true);
    model = service.modelInfo().model;
    const count = chatMetrics(registry, model);
    server = await ChatServer.start(service, { host: '127.0.0.1', port: 0, token: TOKEN, defaultExperiment: '', monitor: () => monitor, onAnswer: count }, pino({ level: 'silent' }));
    client = new OpenAI({ baseURL: `http://127.0.0.1:${server.port}/v1`, apiKey: TOKEN, maxRetries: 0 });
  }, 300_000);

  afterAll(async () => {
    await server?.close();
    await backend?.close();
  });

  /** What the engine gives the conversation through Generate, with every layer's activation. */
  const engine = async (seed: number, experiment = '', maxNewTokens = 12) => {
    const r = await service.generate({ itemId: 'direct', messages, sampling: { temperature: 0.9, topP: 0.95, maxNewTokens, maxContext: 4096, seed, enableThinking: false }, seed, layers: [], textOnly: false, cappingExperiment: experiment });
    expect(r.error).toBeUndefined();
    return { text: r.text, activation: decodeTensor(r.activation, 'a').data, promptTokens: r.promptTokens, completionTokens: r.completionTokens, ids: r.responseTokenIds };
  };
  /** The answer's projection on the unit axis at the model's target layer, in float64 from every layer's activation. */
  const projectionOf = (activation: Float32Array) => {
    const layer = monitor.layer;
    const row = Array.from(axis.subarray(layer * d, (layer + 1) * d));
    const n = Math.sqrt(row.reduce((s, x) => s + x * x, 0));
    return row.reduce((s, x, i) => s + (x / n) * activation[layer * d + i], 0);
  };

  it('lists the model, and answers as the engine does for the same conversation and seed, with the projection on the axis', async () => {
    const models = await client.models.list();
    expect(models.data.map((m) => m.id)).toEqual([model]);
    const reply = await client.chat.completions.create({ model, messages, temperature: 0.9, top_p: 0.95, max_tokens: 12, seed: 5 });
    const direct = await engine(5);
    expect(reply.choices[0].message.content).toBe(direct.text);
    expect(reply.choices[0].finish_reason).toBe(direct.completionTokens === 12 ? 'length' : 'stop');
    expect(reply.usage).toEqual({ prompt_tokens: direct.promptTokens, completion_tokens: direct.completionTokens, total_tokens: direct.promptTokens + direct.completionTokens });
    const ext = (reply as unknown as { assistant_axis: { capping_experiment: string; projection: number; layer: number } }).assistant_axis;
    expect(ext).toMatchObject({ capping_experiment: 'none', layer: 2 });
    expect(Math.abs(ext.projection - projectionOf(direct.activation))).toBeLessThanOrEqual(1e-4);
  });

  it('streams the same answer in pieces (server-sent events), the extension and usage in its last chunks', async () => {
    const stream = await client.chat.completions.create({ model, messages, temperature: 0.9, top_p: 0.95, max_tokens: 12, seed: 6, stream: true, stream_options: { include_usage: true } });
    const pieces: string[] = [];
    let finish: string | null = null;
    let ext: { projection: number } | undefined;
    let usage: unknown;
    for await (const chunk of stream) {
      const c = chunk.choices[0];
      if (c?.delta.content) pieces.push(c.delta.content);
      if (c?.finish_reason) finish = c.finish_reason;
      ext ??= (chunk as unknown as { assistant_axis?: { projection: number } }).assistant_axis;
      usage ??= chunk.usage ?? undefined;
    }
    const direct = await engine(6);
    expect(pieces.join('')).toBe(direct.text);
    expect(pieces.length).toBeGreaterThan(1);
    expect(finish).toBe(direct.completionTokens === 12 ? 'length' : 'stop');
    expect(usage).toEqual({ prompt_tokens: direct.promptTokens, completion_tokens: direct.completionTokens, total_tokens: direct.promptTokens + direct.completionTokens });
    expect(Math.abs(ext!.projection - projectionOf(direct.activation))).toBeLessThanOrEqual(1e-4);
  });

  it('caps with the experiment a request names, and counts capped and uncapped answers apart', async () => {
    const body = { model, messages, temperature: 0.9, top_p: 0.95, max_tokens: 12, seed: 7 };
    const capped = await client.chat.completions.create({ ...body, capping_experiment: 'cap' } as OpenAI.ChatCompletionCreateParamsNonStreaming);
    const direct = await engine(7, 'cap');
    expect(capped.choices[0].message.content).toBe(direct.text);
    expect(capped.choices[0].message.content).not.toBe((await engine(7)).text);
    const ext = (capped as unknown as { assistant_axis: { capping_experiment: string; projection: number } }).assistant_axis;
    expect(ext.capping_experiment).toBe('cap');
    expect(Math.abs(ext.projection - projectionOf(direct.activation))).toBeLessThanOrEqual(1e-4);
    const off = await client.chat.completions.create({ ...body, capping_experiment: 'none' } as OpenAI.ChatCompletionCreateParamsNonStreaming);
    expect(off.choices[0].message.content).toBe((await engine(7)).text);
    const text = await registry.metrics();
    expect(text).toMatch(new RegExp(`axis_inference_chat_answers_total\\{model_name="${model}",capped="yes"\\} 1\\n`));
    expect(text).toMatch(new RegExp(`axis_inference_chat_answers_total\\{model_name="${model}",capped="no"\\} [3-9]\\n`));
    // vLLM's latency pair: every generated answer's time to its first token, and per token after it, each under its whole time.
    const histogram = (name: string) => ({ sum: Number(new RegExp(`^${name}_sum (\\S+)$`, 'm').exec(text)![1]), count: Number(new RegExp(`^${name}_count (\\d+)$`, 'm').exec(text)![1]) });
    const e2e = Number(/^axis_inference_e2e_request_latency_seconds_sum\{rpc="Generate"\} (\S+)$/m.exec(text)![1]);
    const generated = Number(/^axis_inference_e2e_request_latency_seconds_count\{rpc="Generate"\} (\d+)$/m.exec(text)![1]);
    const ttft = histogram('axis_inference_time_to_first_token_seconds');
    const tpot = histogram('axis_inference_time_per_output_token_seconds');
    expect(ttft.count).toBe(generated);
    expect(tpot.count).toBe(generated);
    expect(ttft.sum).toBeGreaterThan(0);
    expect(tpot.sum).toBeGreaterThan(0);
    expect(ttft.sum + tpot.sum).toBeLessThan(e2e);
  });

  it('ends the text at a stop string, streamed or not, and projects the text it sent', async () => {
    const full = await engine(8, '', 16);
    // A stop string from the middle of the answer the engine gives.
    const cut = Math.floor(full.text.length / 2);
    const stop = full.text.slice(cut, cut + 3);
    const expected = full.text.slice(0, full.text.indexOf(stop));
    const reply = await client.chat.completions.create({ model, messages, temperature: 0.9, top_p: 0.95, max_tokens: 16, seed: 8, stop: [stop] });
    expect(reply.choices[0].message.content).toBe(expected);
    expect(reply.choices[0].finish_reason).toBe('stop');
    // The item ends where the stop string is complete: usage counts the tokens up to there, by the model's own tokenizer.
    const tokenizer = new Tokenizer(JSON.parse(fs.readFileSync(path.join(modelDir, 'tokenizer.json'), 'utf8')), {});
    let upToStop = 1;
    while (!tokenizer.decode(full.ids.slice(0, upToStop), { skip_special_tokens: true }).includes(stop)) upToStop++;
    expect(upToStop).toBeLessThan(full.ids.length);
    expect(reply.usage?.completion_tokens).toBe(upToStop);
    const stream = await client.chat.completions.create({ model, messages, temperature: 0.9, top_p: 0.95, max_tokens: 16, seed: 8, stop, stream: true });
    let streamed = '';
    for await (const chunk of stream) streamed += chunk.choices[0]?.delta.content ?? '';
    expect(streamed).toBe(expected);
    // The projection is of the answer as sent: Extract's measure of that text.
    const measured = await service.extract({ itemId: 'x', messages: [...messages, { role: 'assistant', content: expected }], layers: [], responseTokenIds: [], enableThinking: false, cappingExperiment: '' });
    const ext = (reply as unknown as { assistant_axis: { projection: number } }).assistant_axis;
    expect(Math.abs(ext.projection - projectionOf(decodeTensor(measured.activation, 'm').data))).toBeLessThanOrEqual(1e-4);
  });

  it('talks in the terminal (axis chat): each answer as the endpoint gives it, then its projection as a number and a bar', async () => {
    const tokenFile = path.join(tempDir('chat-cli'), 'token');
    fs.writeFileSync(tokenFile, `${TOKEN}\n`);
    const cli = execFile(process.execPath, [path.join(ROOT, 'dist/services/cli/axis.js'), 'chat', '--url', `http://127.0.0.1:${server.port}/v1`, '--token-file', tokenFile, '--seed', '4', '--max-new-tokens', '10', '--experiment', 'cap']);
    let stdout = '';
    cli.stdout!.on('data', (b) => (stdout += b));
    cli.stdin!.end('What is a roux?\nAnd a bechamel?\n\n');
    const code = await new Promise((resolve) => cli.on('exit', resolve));
    expect(code).toBe(0);
    // The first answer is the endpoint's for the same request.
    const first = await client.chat.completions.create({ model, messages: [{ role: 'user', content: 'What is a roux?' }], seed: 4, max_tokens: 10, capping_experiment: 'cap' } as OpenAI.ChatCompletionCreateParamsNonStreaming);
    expect(stdout).toContain(`> ${first.choices[0].message.content}\n  [projection ${(first as unknown as { assistant_axis: { projection: number } }).assistant_axis.projection.toFixed(3)} at layer 2 `);
    expect(stdout.match(/\[projection -?\d+\.\d{3} at layer 2 +[·█]{12}\|[·█]{12} +capping: cap\]/g)).toHaveLength(2);
    // The bar: right of the middle toward the Assistant, as long as the largest magnitude so far allows.
    expect(projectionBar(2, 4)).toBe(`${'·'.repeat(12)}|${'█'.repeat(6)}${'·'.repeat(6)}`);
    expect(projectionBar(-4, 4)).toBe(`${'█'.repeat(12)}|${'·'.repeat(12)}`);
  });

  it('projects every assistant turn of the conversation on request, the answer included, as the projection pass does', async () => {
    const history = [...messages, { role: 'assistant' as const, content: 'A roux is flour cooked in fat.' }, { role: 'user' as const, content: 'And what is it for?' }];
    const reply = await client.chat.completions.create({ model, messages: history, max_tokens: 8, seed: 9, projection_turns: true } as OpenAI.ChatCompletionCreateParamsNonStreaming);
    const ext = (reply as unknown as { assistant_axis: { projection: number; turns: { message_index: number; projection: number }[] } }).assistant_axis;
    expect(ext.turns.map((t) => t.message_index)).toEqual([2, 4]);
    // The conversation with the answer, through the projection pass with the whole axis (every
    // layer's row, normalised there): the turns at the target layer. (Its one rendering tokenizes
    // the answer's text again, so the answer's turn need not be the reply's projection, which
    // comes from the sampled tokens: test/inference/projection.test.ts has the pass against a
    // float64 forward.)
    const all = [...history, { role: 'assistant', content: reply.choices[0].message.content! }];
    const whole = await service.projectConversation({ messages: all, axis: encodeTensor({ shape: [L, d], data: axis }), axisLayers: [], tokenProjections: false, enableThinking: false, chunkTokens: 0 });
    expect(whole.turns.map((t) => t.messageIndex)).toEqual([2, 4]);
    whole.turns.forEach((t, k) => expect(Math.abs(ext.turns[k].projection - t.projections[monitor.layer])).toBeLessThanOrEqual(1e-4));
  });

  it('refuses a missing or wrong token, another model, and bad fields, naming the field', async () => {
    const wrong = new OpenAI({ baseURL: `http://127.0.0.1:${server.port}/v1`, apiKey: 'nope', maxRetries: 0 });
    await expect(wrong.models.list()).rejects.toMatchObject({ status: 401 });
    const noToken = await fetch(`http://127.0.0.1:${server.port}/v1/models`);
    expect(noToken.status).toBe(401);
    const refused = async (body: Record<string, unknown>) => client.chat.completions.create({ model, messages, max_tokens: 4, ...body } as OpenAI.ChatCompletionCreateParamsNonStreaming).then(
      () => undefined,
      (e: { status: number; error: { param: string | null; message: string } }) => ({ status: e.status, param: e.error?.param, message: e.error?.message }),
    );
    expect(await refused({ model: 'other' })).toMatchObject({ status: 404, param: 'model' });
    expect(await refused({ temperature: 5 })).toMatchObject({ status: 400, param: 'temperature', message: 'temperature: a number in [0, 2], got 5' });
    expect(await refused({ top_p: 0 })).toMatchObject({ status: 400, param: 'top_p' });
    expect(await refused({ max_tokens: 0 })).toMatchObject({ status: 400, param: 'max_tokens' });
    expect(await refused({ n: 2 })).toMatchObject({ status: 400, param: 'n' });
    expect(await refused({ stop: ['a', 'b', 'c', 'd', 'e'] })).toMatchObject({ status: 400, param: 'stop' });
    expect(await refused({ messages: [{ role: 'wizard', content: 'hi' }] })).toMatchObject({ status: 400, param: 'messages[0].role' });
    expect(await refused({ messages: [] })).toMatchObject({ status: 400, param: 'messages' });
    expect(await refused({ projection_turns: 'yes' })).toMatchObject({ status: 400, param: 'projection_turns' });
    expect(await refused({ capping_experiment: 'nope' })).toMatchObject({ status: 400, param: 'capping_experiment', message: expect.stringMatching(/capping_experiment: "nope" is not an experiment of .*capping\.json \(it has cap\)/) });
    const notJson = await fetch(`http://127.0.0.1:${server.port}/v1/chat/completions`, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' }, body: '{"model": ' });
    expect(notJson.status).toBe(400);
    expect(((await notJson.json()) as { error: { message: string } }).error.message).toMatch(/^the body is not JSON/);
    // The endpoint still answers after all that.
    expect((await client.chat.completions.create({ model, messages, max_tokens: 2, seed: 1 })).choices).toHaveLength(1);
  });
});
