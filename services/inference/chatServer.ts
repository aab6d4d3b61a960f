import * as grpc from '@grpc/grpc-js';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import { bearerHeaderMatches } from '../shared/auth';
import { decodeTensor, encodeTensor } from '../shared/tensor';
import { AxisExtension, ChatRequest, ChatRequestError, chunkBody, completionBody, completionId, generateRequest, parseChatRequest, StopScanner, usageChunkBody } from './chatCompletions';
import type { ProjectionMonitor } from './monitor';
import type { InferenceService } from './service';

/** The largest request body read (a long conversation's text fits many times over). */
const MAX_BODY_BYTES = 8 * 2 ** 20;

export interface ChatServerOptions {
  host: string;
  port: number;
  /** The bearer token every request must carry. */
  token: string;
  /** The experiment applied when a request names none (`--chat-capping-experiment`; empty: none). */
  defaultExperiment: string;
  /** The replica's monitored axis, when it has one: each reply's projection on it. */
  monitor: () => ProjectionMonitor | undefined;
  /** Each answer, capped or not, for the metrics. */
  onAnswer?: (capped: boolean) => void;
}

/** HTTP statuses for the item errors the service gives. */
const HTTP_OF: Partial<Record<grpc.status, number>> = {
  [grpc.status.INVALID_ARGUMENT]: 400,
  [grpc.status.FAILED_PRECONDITION]: 400,
  [grpc.status.OUT_OF_RANGE]: 400,
  [grpc.status.UNAVAILABLE]: 503,
  [grpc.status.RESOURCE_EXHAUSTED]: 429,
  [grpc.status.CANCELLED]: 499,
};

/**
 * The OpenAI-compatible chat endpoint of an inference replica (`--chat-port`): `GET /v1/models`
 * and `POST /v1/chat/completions`, streaming (server-sent events) or not, behind a bearer token.
 * A thin adapter: the request goes through the service's Generate, under its capacity limit
 * and metrics, into the same engine slots as run items.
 */
export class ChatServer {
  private constructor(private readonly server: http.Server) {}

  get port(): number {
    return (this.server.address() as AddressInfo).port;
  }

  static async start(service: InferenceService, opts: ChatServerOptions, log: Logger): Promise<ChatServer> {
    const server = http.createServer((req, res) => {
      void handle(req, res).catch((err: Error) => {
        log.error({ err }, 'chat request failed');
        if (!res.headersSent) send(res, 500, new ChatRequestError(500, 'internal error', null, 'server_error').body());
        else res.end();
      });
    });

    async function handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
      const url = (req.url ?? '').split('?')[0];
      if (!bearerHeaderMatches(req.headers.authorization, opts.token)) return send(res, 401, new ChatRequestError(401, 'a bearer token is required (Authorization: Bearer ...)', null, 'authentication_error').body());
      let info;
      try {
        info = service.modelInfo();
      } catch (err) {
        return send(res, 503, new ChatRequestError(503, (err as Error).message, null, 'server_error').body());
      }
      if (req.method === 'GET' && url === '/v1/models') {
        return send(res, 200, { object: 'list', data: [{ id: info.model, object: 'model', created: 0, owned_by: 'assistant-axis' }] });
      }
      if (url !== '/v1/chat/completions') return send(res, 404, new ChatRequestError(404, `no route ${req.method} ${url}`, null, 'not_found_error').body());
      if (req.method !== 'POST') return send(res, 405, new ChatRequestError(405, `${url} takes POST`).body());
      let chat: ChatRequest;
      try {
        chat = parseChatRequest(await readJson(req), info.model);
      } catch (err) {
        if (err instanceof ChatRequestError) return send(res, err.status, err.body());
        throw err;
      }
      const asked = chat.cappingExperiment ?? opts.defaultExperiment;
      const experiment = asked === 'none' ? '' : asked;
      const monitor = opts.monitor();
      if (chat.projectTurns && !monitor) return send(res, 400, new ChatRequestError(400, 'projection_turns: this replica monitors no axis (--monitor-axis)', 'projection_turns').body());
      const id = completionId();
      const created = Math.floor(Date.now() / 1000);
      // A client that goes away stops its item at the engine's next step.
      const gone = new AbortController();
      res.on('close', () => {
        if (!res.writableFinished) gone.abort();
      });
      const scanner = new StopScanner(chat.stop);
      const write = (body: unknown) => res.write(`data: ${JSON.stringify(body)}\n\n`);
      if (chat.stream) {
        res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' });
        write(chunkBody(id, created, info.model, { role: 'assistant', content: '' }, null));
      }
      // A stop string ends the item too: its slot is free and `usage` counts the tokens up to it.
      const onText = (delta: string) => {
        const piece = scanner.push(delta);
        if (chat.stream && piece) write(chunkBody(id, created, info.model, { content: piece }, null));
        return scanner.stopped;
      };
      const result = await service.generate(generateRequest(chat, experiment, monitor?.layer, id), gone.signal, { onText, lane: 'chat' });
      if (result.error) {
        const status = HTTP_OF[result.error.code as grpc.status] ?? 500;
        const param = result.error.message.startsWith('capping_experiment') ? 'capping_experiment' : null;
        const error = new ChatRequestError(status, result.error.message, param, status === 400 ? 'invalid_request_error' : 'server_error');
        if (!chat.stream) return send(res, status, error.body());
        write(error.body());
        res.end('data: [DONE]\n\n');
        return;
      }
      const rest = scanner.stopped ? '' : scanner.final();
      if (chat.stream && rest) write(chunkBody(id, created, info.model, { content: rest }, null));
      const text = scanner.answer;
      opts.onAnswer?.(experiment !== '');
      // Where the answer lies on the axis: from its activation, or, where a stop string cut it, by measuring the text sent.
      let projection: number | null = null;
      if (monitor) {
        let activation = result.activation && decodeTensor(result.activation, 'activation');
        if (scanner.stopped) {
          const measured = await service.extract({ itemId: `chat/${id}`, messages: [...chat.messages, { role: 'assistant', content: text }], layers: [monitor.layer], responseTokenIds: [], enableThinking: false, cappingExperiment: experiment }, gone.signal);
          activation = measured.activation && decodeTensor(measured.activation, 'activation');
        }
        projection = (activation && monitor.project(activation, [monitor.layer])) ?? null;
      }
      const axis: AxisExtension = { capping_experiment: experiment || 'none', projection, layer: monitor ? monitor.layer : null };
      if (chat.projectTurns && monitor) {
        try {
          const projected = await service.projectConversation({ messages: [...chat.messages, { role: 'assistant', content: text }], axis: encodeTensor(monitor.unitRow()), axisLayers: [monitor.layer], tokenProjections: false, enableThinking: false, chunkTokens: 0 }, gone.signal);
          axis.turns = projected.turns.map((t) => ({ message_index: t.messageIndex, projection: t.projections[0] }));
        } catch (err) {
          // The answer stands; the turns say why they are missing (a conversation longer than the model's context, say).
          const code = (err as { code?: number }).code;
          if (typeof code !== 'number') throw err;
          axis.turns_error = (err as Error).message;
        }
      }
      const usage = { prompt_tokens: result.promptTokens, completion_tokens: result.completionTokens, total_tokens: result.promptTokens + result.completionTokens };
      const finish = scanner.stopped ? 'stop' : (result.finishReason as 'stop' | 'length');
      if (!chat.stream) return send(res, 200, completionBody(id, created, info.model, text, finish, usage, axis));
      write(chunkBody(id, created, info.model, {}, finish, { assistant_axis: axis }));
      if (chat.includeUsage) write(usageChunkBody(id, created, info.model, usage));
      res.end('data: [DONE]\n\n');
    }

    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(opts.port, opts.host, () => resolve());
    });
    log.info({ port: (server.address() as AddressInfo).port, defaultExperiment: opts.defaultExperiment || 'none' }, 'chat endpoint listening (OpenAI-compatible: /v1/chat/completions, /v1/models)');
    return new ChatServer(server);
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }
}

function send(res: http.ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

async function readJson(req: http.IncomingMessage): Promise<unknown> {
  const parts: Buffer[] = [];
  let size = 0;
  for await (const part of req) {
    size += (part as Buffer).length;
    if (size > MAX_BODY_BYTES) throw new ChatRequestError(413, `the body is larger than ${MAX_BODY_BYTES} bytes`);
    parts.push(part as Buffer);
  }
  try {
    return JSON.parse(Buffer.concat(parts).toString('utf8'));
  } catch (err) {
    throw new ChatRequestError(400, `the body is not JSON (${(err as Error).message})`);
  }
}
