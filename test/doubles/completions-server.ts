import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { LoadedModel } from '../../services/inference/onnx/model';
import { digest, Rng } from '../../services/shared/random';

/** One request as the double received it. */
export interface CompletionCall {
  prompt: number[] | string;
  seed: number;
  maxTokens: number;
  body: Record<string, unknown>;
}

/**
 * An OpenAI-compatible completions server (vLLM's dialect: token-id prompts, `return_token_ids`,
 * `stop_token_ids`, `seed`) over real HTTP, generating with this project's own engine on a model
 * it is given, so that its texts and token ids are real generations: with the same seed an item
 * gets the tokens our engine samples for it (the same uniforms from the seed). Faults on demand:
 * status codes, hangs, a response cut in the middle; and options to misbehave (no token ids,
 * refusing token-id prompts, more tokens than asked, ids outside the vocabulary).
 */
export class CompletionsServer {
  readonly calls: CompletionCall[] = [];
  private server: http.Server | undefined;
  private faults: ('hang' | 'cut' | number)[] = [];
  private readonly sockets = new Set<import('node:net').Socket>();
  /** Misbehaviours (off by default). */
  options = { returnTokenIds: true, acceptTokenIds: true, extraTokens: 0, outsideVocabulary: false, servedName: 'tiny-served' };

  constructor(private readonly model: LoadedModel) {}

  get baseUrl(): string {
    return `http://127.0.0.1:${(this.server!.address() as AddressInfo).port}/v1`;
  }

  /** The next `n` completions get `fault` (an HTTP status, a hang, or a response cut mid-body). */
  failNext(n: number, fault: 'hang' | 'cut' | number): void {
    for (let i = 0; i < n; i++) this.faults.push(fault);
  }

  async start(): Promise<void> {
    this.server = http.createServer((req, res) => void this.handle(req, res));
    this.server.on('connection', (s) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
  }

  async stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const json = (status: number, body: unknown) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(body));
    };
    if (req.method === 'GET' && req.url === '/v1/models') return json(200, { object: 'list', data: [{ id: this.options.servedName, object: 'model' }] });
    if (req.method !== 'POST' || req.url !== '/v1/completions') return json(404, { error: { message: `no route ${req.method} ${req.url}` } });
    let raw = '';
    for await (const chunk of req) raw += chunk;
    const body = JSON.parse(raw) as Record<string, any>;
    const fault = this.faults.shift();
    if (fault === 'hang') return; // never answers; the client's timeout ends it
    if (typeof fault === 'number') return json(fault, { error: { message: `injected ${fault}` } });
    if (body.model !== this.options.servedName) return json(404, { error: { message: `model ${body.model} not served` } });
    if (Array.isArray(body.prompt) && !this.options.acceptTokenIds) return json(400, { error: { message: 'prompt must be a string' } });
    const ids: number[] = Array.isArray(body.prompt) ? body.prompt : this.model.encode(String(body.prompt));
    this.calls.push({ prompt: body.prompt, seed: Number(body.seed ?? 0), maxTokens: Number(body.max_tokens), body });
    // The engine's own sampling: the item's uniforms from its seed, as the inference service draws them.
    const maxNew = Number(body.max_tokens);
    const rng = new Rng(digest({ itemSeed: Number(body.seed ?? 0) }));
    const uniforms = new Float32Array(maxNew);
    for (let i = 0; i < maxNew; i++) uniforms[i] = rng.next();
    const [result] = await this.model.runner.run([{ ids, maxNew, temperature: Number(body.temperature ?? 1), topP: Number(body.top_p ?? 1), uniforms }]);
    let tokenIds = [...result.responseIds];
    for (let i = 0; i < this.options.extraTokens; i++) tokenIds.push(tokenIds[0] ?? 1);
    if (this.options.outsideVocabulary) tokenIds = [...tokenIds, this.model.metadata.vocab_size + 5];
    const choice: Record<string, unknown> = { index: 0, text: this.model.decode(tokenIds.filter((t) => t < this.model.metadata.vocab_size)), finish_reason: result.stopped ? 'stop' : 'length', logprobs: null };
    if (this.options.returnTokenIds && body.return_token_ids) choice.token_ids = tokenIds;
    const payload = JSON.stringify({ id: `cmpl-${this.calls.length}`, object: 'text_completion', created: 0, model: body.model, choices: [choice], usage: { prompt_tokens: ids.length, completion_tokens: tokenIds.length, total_tokens: ids.length + tokenIds.length } });
    if (fault === 'cut') {
      // Headers and half the body, then the connection dropped.
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': String(payload.length) });
      res.write(payload.slice(0, payload.length >> 1));
      setTimeout(() => req.socket.destroy(), 5);
      return;
    }
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(payload);
  }
}
