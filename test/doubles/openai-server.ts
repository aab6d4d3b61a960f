import { createHash } from 'node:crypto';
import * as http from 'node:http';

export type Fault = 'rate_limited' | 'server_error' | 'hang' | 'garbage';

export interface FakeOpenAIOptions {
  /** Milliseconds before answering each request (e.g. a lognormal sampler); none by default. */
  latencyMs?: () => number;
  /** Probability of each fault on any request. */
  faults?: Partial<Record<Fault, number>>;
  /** Retry-After sent with a 429, in milliseconds. */
  retryAfterMs?: number;
  random?: () => number;
  /** Batch mode: milliseconds from a batch's creation to its completion. */
  batchDelayMs?: number;
}

export interface RecordedRequest {
  path: string;
  authorization: string | undefined;
  body: any;
  /** When the request arrived, and when its reply was written (none for hangs and batch calls). */
  at: number;
  answeredAt?: number;
  /** False when the client had already closed the connection (it timed out) before the reply was written. */
  clientWaiting?: boolean;
  outcome: 'ok' | Fault | 'injected';
}

/**
 * A real HTTP server on loopback that speaks the OpenAI chat-completions API, for judge tests
 * and benchmarks. Its reply is a pure function of the prompt (see `expectedReply`), with usage
 * counts. Faults: the next N requests answered with a status (`failNext`), and random 429s with
 * Retry-After, 500s, hangs (no answer until the client gives up) and garbage bodies.
 */
export class FakeOpenAIServer {
  private server: http.Server | undefined;
  requests: RecordedRequest[] = [];
  private faults: { status: number; message?: string }[] = [];
  /** While set, every request's connection is dropped unanswered: the API is down. */
  down = false;
  /** While set, every request gets 429 with Retry-After. */
  rateLimited = false;
  private readonly hanging = new Set<http.ServerResponse>();
  port = 0;

  constructor(private readonly opts: FakeOpenAIOptions = {}) {}

  /** Requests held unanswered now (a hang's connection closed by the client leaves this set). */
  get hangingCount(): number {
    return this.hanging.size;
  }

  get baseUrl(): string {
    return `http://127.0.0.1:${this.port}/v1`;
  }

  /** The next `count` requests get HTTP `status` (e.g. 429, 500), with `message` as the error's text if given. */
  failNext(count: number, status: number, message?: string): void {
    for (let i = 0; i < count; i++) this.faults.push({ status, message });
  }

  async start(): Promise<void> {
    this.server = http.createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        const url = req.url ?? '';
        // The Files and Batches APIs (batch mode) are served apart from chat completions.
        if (url.startsWith('/v1/files') || url.startsWith('/v1/batches')) {
          this.batchApi(req, res, Buffer.concat(chunks)).catch((err) => {
            res.writeHead(500, { 'content-type': 'application/json' });
            res.end(JSON.stringify({ error: { message: String(err) } }));
          });
          return;
        }
        const raw = Buffer.concat(chunks).toString('utf8');
        let body: any;
        try {
          body = JSON.parse(raw || '{}');
        } catch {
          res.writeHead(400, { 'content-type': 'application/json' });
          res.end(JSON.stringify({ error: { message: 'invalid JSON', type: 'invalid_request_error' } }));
          return;
        }
        const record: RecordedRequest = { path: req.url ?? '', authorization: req.headers.authorization, body, at: performance.now(), outcome: 'ok' };
        this.requests.push(record);
        if (this.down) {
          record.outcome = 'injected';
          req.socket.destroy();
          return;
        }
        if (this.rateLimited) this.faults.unshift({ status: 429 });
        const fault = this.faults.shift();
        if (fault) {
          record.outcome = 'injected';
          res.writeHead(fault.status, { 'content-type': 'application/json', 'retry-after-ms': '10' });
          res.end(JSON.stringify({ error: { message: fault.message ?? `injected ${fault.status}`, type: 'server_error' } }));
          return;
        }
        const random = this.opts.random ?? Math.random;
        let r = random();
        let chosen: Fault | undefined;
        for (const [f, p] of Object.entries(this.opts.faults ?? {}) as [Fault, number][]) {
          if (r < p) {
            chosen = f;
            break;
          }
          r -= p;
        }
        if (chosen) record.outcome = chosen;
        if (chosen === 'hang') {
          this.hanging.add(res);
          res.on('close', () => this.hanging.delete(res));
          return;
        }
        const delay = this.opts.latencyMs?.() ?? 0;
        const answer = () => {
          record.answeredAt = performance.now();
          record.clientWaiting = !res.destroyed && !req.socket.destroyed;
          this.answer(req, res, body, chosen);
        };
        if (delay > 0) setTimeout(answer, delay);
        else answer();
      });
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', () => resolve()));
    this.port = (this.server.address() as { port: number }).port;
  }

  private answer(req: http.IncomingMessage, res: http.ServerResponse, body: any, fault: Fault | undefined): void {
    if (fault === 'rate_limited') {
      res.writeHead(429, { 'content-type': 'application/json', 'retry-after-ms': String(this.opts.retryAfterMs ?? 100) });
      res.end(JSON.stringify({ error: { message: 'Rate limit reached', type: 'requests', code: 'rate_limit_exceeded' } }));
      return;
    }
    if (fault === 'server_error') {
      res.writeHead(500, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { message: 'The server had an error', type: 'server_error' } }));
      return;
    }
    if (fault === 'garbage') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('<html>upstream proxy error</html>');
      return;
    }
    if (req.method !== 'POST' || !req.url?.endsWith('/chat/completions')) {
      res.writeHead(404, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { message: 'not found' } }));
      return;
    }
    const prompt: string = body.messages?.[0]?.content ?? '';
    const content = expectedReply(prompt);
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(
      JSON.stringify({
        id: 'chatcmpl-test',
        object: 'chat.completion',
        created: Math.floor(Date.now() / 1000),
        model: body.model,
        choices: [{ index: 0, message: { role: 'assistant', content }, finish_reason: 'stop' }],
        usage: { prompt_tokens: Math.ceil(prompt.length / 4), completion_tokens: 1, total_tokens: Math.ceil(prompt.length / 4) + 1 },
      }),
    );
  }

  readonly files = new Map<string, string>();
  readonly batches = new Map<string, { id: string; inputFileId: string; created: number; outputFileId?: string; total: number; metadata: Record<string, string> | null }>();
  /** While set, a batch is created but the reply to its creation is lost (the connection dropped): once. */
  dropNextBatchCreateReply = false;

  /** Minimal Files and Batches APIs: a batch completes `batchDelayMs` after it is created. */
  private async batchApi(req: http.IncomingMessage, res: http.ServerResponse, raw: Buffer): Promise<void> {
    const url = req.url ?? '';
    const send = (status: number, value: unknown, type = 'application/json') => {
      res.writeHead(status, { 'content-type': type });
      res.end(typeof value === 'string' ? value : JSON.stringify(value));
    };
    this.requests.push({ path: url, authorization: req.headers.authorization, body: {}, at: performance.now(), outcome: 'ok' });
    if (req.method === 'POST' && url === '/v1/files') {
      const form = await new Request('http://localhost/v1/files', { method: 'POST', headers: req.headers as Record<string, string>, body: raw }).formData();
      const file = form.get('file') as File;
      const id = `file-${this.files.size + 1}`;
      this.files.set(id, await file.text());
      return send(200, { id, object: 'file', bytes: file.size, created_at: Math.floor(Date.now() / 1000), filename: file.name, purpose: form.get('purpose'), status: 'processed' });
    }
    const content = /^\/v1\/files\/([^/]+)\/content$/.exec(url);
    if (req.method === 'GET' && content) {
      const text = this.files.get(content[1]);
      return text === undefined ? send(404, { error: { message: 'no such file' } }) : send(200, text, 'application/octet-stream');
    }
    if (req.method === 'POST' && url === '/v1/batches') {
      const body = JSON.parse(raw.toString('utf8'));
      const input = this.files.get(body.input_file_id);
      if (input === undefined) return send(400, { error: { message: `no file ${body.input_file_id}` } });
      const id = `batch_${this.batches.size + 1}`;
      this.batches.set(id, { id, inputFileId: body.input_file_id, created: Date.now(), total: input.trim().split('\n').length, metadata: body.metadata ?? null });
      if (this.dropNextBatchCreateReply) {
        this.dropNextBatchCreateReply = false;
        req.socket.destroy();
        return;
      }
      return send(200, this.batchObject(id));
    }
    // The list, newest first, in pages (`limit`, `after` a batch id), as the API serves it.
    const list = /^\/v1\/batches(\?.*)?$/.exec(url);
    if (req.method === 'GET' && list) {
      const params = new URLSearchParams(list[1] ?? '');
      const all = [...this.batches.keys()].reverse();
      const start = params.get('after') ? all.indexOf(params.get('after')!) + 1 : 0;
      const page = all.slice(start, start + Number(params.get('limit') ?? 20));
      return send(200, { object: 'list', data: page.map((id) => this.batchObject(id)), first_id: page[0] ?? null, last_id: page[page.length - 1] ?? null, has_more: start + page.length < all.length });
    }
    const batch = /^\/v1\/batches\/([^/]+)$/.exec(url);
    if (req.method === 'GET' && batch) {
      return this.batches.has(batch[1]) ? send(200, this.batchObject(batch[1])) : send(404, { error: { message: 'no such batch' } });
    }
    send(404, { error: { message: `not served here: ${req.method} ${url}` } });
  }

  private batchObject(id: string): unknown {
    const b = this.batches.get(id)!;
    const done = Date.now() - b.created >= (this.opts.batchDelayMs ?? 0);
    if (done && !b.outputFileId) {
      const lines = this.files.get(b.inputFileId)!.trim().split('\n').map((l) => JSON.parse(l));
      const out = lines.map((l, i) => {
        const prompt = l.body.messages[0].content as string;
        const usage = { prompt_tokens: Math.ceil(prompt.length / 4), completion_tokens: 1, total_tokens: Math.ceil(prompt.length / 4) + 1 };
        return JSON.stringify({ id: `batch_req_${i}`, custom_id: l.custom_id, response: { status_code: 200, request_id: `req_${i}`, body: { id: `chatcmpl-${i}`, object: 'chat.completion', model: l.body.model, choices: [{ index: 0, message: { role: 'assistant', content: expectedReply(prompt) }, finish_reason: 'stop' }], usage } }, error: null });
      });
      b.outputFileId = `file-${this.files.size + 1}`;
      this.files.set(b.outputFileId, out.join('\n') + '\n');
    }
    return {
      id,
      object: 'batch',
      endpoint: '/v1/chat/completions',
      input_file_id: b.inputFileId,
      completion_window: '24h',
      status: done ? 'completed' : 'in_progress',
      output_file_id: b.outputFileId ?? null,
      error_file_id: null,
      created_at: Math.floor(b.created / 1000),
      request_counts: { total: b.total, completed: done ? b.total : 0, failed: 0 },
      metadata: b.metadata,
    };
  }

  async stop(): Promise<void> {
    for (const res of this.hanging) res.destroy();
    this.server?.closeAllConnections?.();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }
}

/**
 * The deterministic judge: half the prompts get "3", about one in sixteen a reply with no
 * usable score, the rest "0", "1" or "2", all decided by the prompt's sha256.
 */
export function expectedReply(prompt: string): string {
  const h = createHash('sha256').update(prompt).digest();
  if (h[1] < 16) return 'I would rather not say.';
  if (h[0] < 128) return '3';
  return `Score: ${h[0] % 3}`;
}

export function expectedScore(prompt: string): number | undefined {
  const r = expectedReply(prompt);
  const m = /\b\d+\b/.exec(r);
  return m ? Number(m[0]) : undefined;
}
