import { createHash } from 'node:crypto';
import * as http from 'node:http';

/**
 * A real HTTP server on loopback that speaks the OpenAI chat-completions API, for judge tests.
 * Its reply is a pure function of the prompt (see `expectedReply`), and it can inject faults:
 * the next N requests answered with an HTTP error status.
 */
export class FakeOpenAIServer {
  private server: http.Server | undefined;
  requests: { path: string; authorization: string | undefined; body: any }[] = [];
  private faults: number[] = [];
  port = 0;

  get baseUrl(): string {
    return `http://127.0.0.1:${this.port}/v1`;
  }

  /** The next `count` requests get HTTP `status` (e.g. 429, 500). */
  failNext(count: number, status: number): void {
    for (let i = 0; i < count; i++) this.faults.push(status);
  }

  async start(): Promise<void> {
    this.server = http.createServer((req, res) => {
      let raw = '';
      req.on('data', (c) => (raw += c));
      req.on('end', () => {
        let body: any;
        try {
          body = JSON.parse(raw || '{}');
        } catch {
          res.writeHead(400, { 'content-type': 'application/json' });
          res.end(JSON.stringify({ error: { message: 'invalid JSON', type: 'invalid_request_error' } }));
          return;
        }
        this.requests.push({ path: req.url ?? '', authorization: req.headers.authorization, body });
        const fault = this.faults.shift();
        if (fault) {
          res.writeHead(fault, { 'content-type': 'application/json', 'retry-after-ms': '10' });
          res.end(JSON.stringify({ error: { message: `injected ${fault}`, type: 'server_error' } }));
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
      });
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', () => resolve()));
    this.port = (this.server.address() as { port: number }).port;
  }

  async stop(): Promise<void> {
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
