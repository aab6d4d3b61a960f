import * as grpc from '@grpc/grpc-js';
import { setMaxListeners } from 'node:events';
import { DEFAULT_SERVICE_PENDING_BYTES, MAX_PENDING_BYTES_PER_STREAM } from './defaults';
import type { Logger } from './logger';
import { detailsMetadata } from './statusDetails';

/** An error that becomes a gRPC status with this code and message. */
export class RpcError extends Error {
  constructor(public readonly code: grpc.status, message: string) {
    super(message);
  }
}

export const invalidArgument = (message: string) => new RpcError(grpc.status.INVALID_ARGUMENT, message);
export const failedPrecondition = (message: string) => new RpcError(grpc.status.FAILED_PRECONDITION, message);
export const notFound = (message: string) => new RpcError(grpc.status.NOT_FOUND, message);

/** The status a thrown error becomes; ours (RpcError) carry their details (the field at fault, the reason) in trailers too. */
export function toServiceError(err: unknown): Partial<grpc.ServiceError> {
  if (err instanceof RpcError) return { code: err.code, details: err.message, message: err.message, metadata: detailsMetadata(err.code, err.message) };
  const code = (err as { code?: unknown })?.code;
  if (typeof code === 'number' && code in grpc.status) {
    const details = (err as grpc.ServiceError).details ?? String(err);
    return { code, details, message: details };
  }
  return { code: grpc.status.INTERNAL, details: `internal error: ${(err as Error)?.message ?? String(err)}`, message: String(err) };
}

/** Wraps an async unary handler: thrown RpcErrors become their status, anything else INTERNAL (and is logged). */
export function unary<Req, Res>(log: Logger, handler: (req: Req, call: grpc.ServerUnaryCall<Req, Res>) => Promise<Res>): grpc.handleUnaryCall<Req, Res> {
  return (call, callback) => {
    handler(call.request, call).then(
      (res) => callback(null, res),
      (err) => {
        if (!(err instanceof RpcError)) log.error({ err, method: call.getPath() }, 'unary call failed');
        callback(toServiceError(err));
      },
    );
  };
}

/**
 * A request the service's decoder could not read. grpc-js answers an undecodable message with
 * INTERNAL and, on a bidirectional stream whose earlier messages are still being handled, never
 * ends the call; so services decode through `tolerantDecoding` and answer INVALID_ARGUMENT.
 */
const UNDECODABLE = Symbol('undecodable');

/** The encoded size of a request, set by the tolerant decoder (what pending work is bounded by). */
const WIRE_BYTES = Symbol('wireBytes');

export function wireBytes(req: unknown): number {
  return typeof req === 'object' && req !== null && WIRE_BYTES in req ? Number((req as Record<symbol, unknown>)[WIRE_BYTES]) : 0;
}

export function undecodableReason(req: unknown): string | undefined {
  return typeof req === 'object' && req !== null && UNDECODABLE in req ? String((req as Record<symbol, unknown>)[UNDECODABLE]) : undefined;
}

/**
 * The service definition with decoders that never throw (an undecodable message becomes a
 * marked object) and handlers for single requests that answer such a message with
 * INVALID_ARGUMENT; streams of requests check theirs in `serveBidi`.
 */
export function tolerantDecoding<D extends grpc.ServiceDefinition, I extends grpc.UntypedServiceImplementation>(definition: D, implementation: I, opts: { guardStreams?: boolean } = {}): { definition: D; implementation: I } {
  const def: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
  const impl: Record<string, unknown> = { ...implementation };
  for (const [name, method] of Object.entries(definition)) {
    const type = method.path.split('/').pop();
    def[name] = {
      ...method,
      requestDeserialize: (bytes: Buffer) => {
        try {
          const req = method.requestDeserialize(bytes);
          if (typeof req === 'object' && req !== null) Object.defineProperty(req, WIRE_BYTES, { value: bytes.length });
          return req;
        } catch (err) {
          return { [UNDECODABLE]: `the ${type} request could not be decoded (${(err as Error).message})` };
        }
      },
    };
    const handler = implementation[name] as ((call: { request?: unknown }, cb?: unknown) => void) | undefined;
    if (handler && method.requestStream && opts.guardStreams) {
      // A library's stream handler (reflection), which reads 'data' itself: an undecodable
      // message ends the stream with INVALID_ARGUMENT instead of reaching it (grpc-js would
      // leave such a stream open until the client's deadline).
      impl[name] = (call: grpc.ServerDuplexStream<unknown, unknown>) => {
        const on = call.on.bind(call);
        let received = 0;
        (call as { on: (event: string, listener: (...args: any[]) => void) => unknown }).on = (event: string, listener: (...args: any[]) => void) =>
          on(event, event !== 'data' ? listener : (req: unknown) => {
            received++;
            const reason = undecodableReason(req);
            if (reason === undefined) return listener(req);
            if (!call.cancelled) failStream(call, invalidArgument(`message ${received} of the stream: ${reason}`));
          });
        return handler(call as never);
      };
      continue;
    }
    if (!handler || method.requestStream) continue;
    impl[name] = (call: { request?: unknown; emit(event: 'error', err: unknown): boolean }, callback?: grpc.sendUnaryData<unknown>) => {
      const reason = undecodableReason(call.request);
      if (reason === undefined) return handler(call, callback);
      const err = invalidArgument(reason);
      if (callback) callback(toServiceError(err));
      else failStream(call, err);
    };
  }
  return { definition: def as D, implementation: impl as I };
}

/** A stand-in server through which a library's `addToServer` adds its services decoded tolerantly (health, reflection). */
export function tolerantServer(server: grpc.Server): grpc.Server {
  return {
    addService: (definition: grpc.ServiceDefinition, implementation: grpc.UntypedServiceImplementation) => {
      const tolerant = tolerantDecoding(definition, implementation, { guardStreams: true });
      server.addService(tolerant.definition, tolerant.implementation);
    },
  } as unknown as grpc.Server;
}

/** Ends a server-streaming call with the error's status (grpc-js sends the status on the stream's 'error' event). */
export function failStream(call: { emit(event: 'error', err: unknown): boolean }, err: unknown): void {
  call.emit('error', toServiceError(err));
}

/**
 * Writes one message of a server stream, waiting while its send buffer is full, so that a
 * long stream (a run's role vectors) is held by the network instead of piling up in memory.
 * False once the call is over (cancelled or closed): stop writing.
 */
export async function writeWhenReady<T>(call: grpc.ServerWritableStream<unknown, T> | grpc.ServerDuplexStream<unknown, T>, msg: T): Promise<boolean> {
  if (call.cancelled || call.destroyed) return false;
  if (call.write(msg)) return true;
  await new Promise<void>((resolve) => {
    const done = () => {
      for (const event of ['drain', 'cancelled', 'close']) call.off(event, done);
      resolve();
    };
    for (const event of ['drain', 'cancelled', 'close']) call.once(event, done);
  });
  return !(call.cancelled || call.destroyed);
}

/** Requests of one stream being handled at once, at most (beyond it the stream is not read). */
export const MAX_PENDING_PER_STREAM = 1024;

/**
 * Bytes of requests being handled at once, shared by every stream of a service (one process):
 * past its limit every stream of the service stops being read until the handled ones are
 * answered, so many clients together cannot make it hold more either.
 */
export class PendingBytes {
  private used = 0;
  private readonly waiting = new Set<() => void>();

  constructor(readonly limit: number) {}

  get bytes(): number {
    return this.used;
  }

  get full(): boolean {
    return this.used >= this.limit;
  }

  add(n: number): void {
    this.used += n;
  }

  release(n: number): void {
    this.used -= n;
    if (this.used < this.limit / 2 && this.waiting.size) {
      const wake = [...this.waiting];
      this.waiting.clear();
      for (const w of wake) w();
    }
  }

  /** Calls `wake` once the service is below half its limit again. */
  whenRoom(wake: () => void): void {
    this.waiting.add(wake);
  }

  forget(wake: () => void): void {
    this.waiting.delete(wake);
  }
}

/** The process's own: each service is one process (DEFAULT_SERVICE_PENDING_BYTES). */
export const SERVICE_PENDING = new PendingBytes(DEFAULT_SERVICE_PENDING_BYTES);

/**
 * Serves a bidirectional stream of independent requests: each is handled as it arrives, its
 * result written when ready (in any order), and the stream ended once the client has ended
 * its side and every result is out. `handle` must not reject: item errors go in its result.
 * The stream is not read while it has too much in hand (MAX_PENDING_PER_STREAM requests, or
 * `streamBytes` of encoded requests), or while the service has (`service`): HTTP/2 flow
 * control then holds the client back instead of the service queueing without bound.
 */
export function serveBidi<Req, Res>(
  call: grpc.ServerDuplexStream<Req, Res>,
  handle: (req: Req, cancelled: AbortSignal) => Promise<Res>,
  limits: { streamBytes?: number; service?: PendingBytes } = {},
): void {
  const streamLimit = limits.streamBytes ?? MAX_PENDING_BYTES_PER_STREAM;
  const service = limits.service ?? SERVICE_PENDING;
  // Aborted when the client cancels the stream (or its connection goes): what is still running for it may stop.
  const cancel = new AbortController();
  // One signal serves every request of the stream (up to MAX_PENDING_PER_STREAM at once), each
  // listening while it runs and leaving when it ends: many listeners are expected, not a leak.
  setMaxListeners(MAX_PENDING_PER_STREAM + 1, cancel.signal);
  let pending = 0;
  let pendingBytes = 0;
  let paused = false;
  let ended = false;
  const finish = () => {
    if (ended && pending === 0 && !call.cancelled) call.end();
  };
  const resumeIfRoom = () => {
    if (!paused || call.cancelled) return;
    if (pending > MAX_PENDING_PER_STREAM / 2 || pendingBytes > streamLimit / 2) return; // this stream's own answers will call again
    if (service.full) return service.whenRoom(resumeIfRoom);
    paused = false;
    call.resume();
  };
  call.on('cancelled', () => {
    cancel.abort();
    service.forget(resumeIfRoom);
  });
  let received = 0;
  call.on('data', (req: Req) => {
    received++;
    const reason = undecodableReason(req);
    if (reason !== undefined) {
      // The stream cannot go on from a message it cannot read: it ends with the reason now.
      if (!call.cancelled) failStream(call, invalidArgument(`message ${received} of the stream: ${reason}`));
      return;
    }
    const bytes = wireBytes(req);
    pending++;
    pendingBytes += bytes;
    service.add(bytes);
    if (!paused && (pending >= MAX_PENDING_PER_STREAM || pendingBytes >= streamLimit || service.full)) {
      paused = true;
      call.pause();
      if (service.full && pending < MAX_PENDING_PER_STREAM && pendingBytes < streamLimit) service.whenRoom(resumeIfRoom);
    }
    void handle(req, cancel.signal).then((res) => {
      pending--;
      pendingBytes -= bytes;
      service.release(bytes);
      if (!call.cancelled) call.write(res);
      resumeIfRoom();
      finish();
    });
  });
  call.on('end', () => {
    ended = true;
    finish();
  });
  call.on('error', () => undefined);
}
