import * as grpc from '@grpc/grpc-js';
import type { Logger } from './logger';

/** An error that becomes a gRPC status with this code and message. */
export class RpcError extends Error {
  constructor(public readonly code: grpc.status, message: string) {
    super(message);
  }
}

export const invalidArgument = (message: string) => new RpcError(grpc.status.INVALID_ARGUMENT, message);
export const failedPrecondition = (message: string) => new RpcError(grpc.status.FAILED_PRECONDITION, message);
export const notFound = (message: string) => new RpcError(grpc.status.NOT_FOUND, message);

export function toServiceError(err: unknown): Partial<grpc.ServiceError> {
  if (err instanceof RpcError) return { code: err.code, details: err.message, message: err.message };
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

/** Ends a server-streaming call with the error's status (grpc-js sends the status on the stream's 'error' event). */
export function failStream(call: { emit(event: 'error', err: unknown): boolean }, err: unknown): void {
  call.emit('error', toServiceError(err));
}

/**
 * Serves a bidirectional stream of independent requests: each is handled as it arrives, its
 * result written when ready (in any order), and the stream ended once the client has ended
 * its side and every result is out. `handle` must not reject: item errors go in its result.
 */
export function serveBidi<Req, Res>(call: grpc.ServerDuplexStream<Req, Res>, handle: (req: Req) => Promise<Res>): void {
  let pending = 0;
  let ended = false;
  const finish = () => {
    if (ended && pending === 0 && !call.cancelled) call.end();
  };
  call.on('data', (req: Req) => {
    pending++;
    void handle(req).then((res) => {
      pending--;
      if (!call.cancelled) call.write(res);
      finish();
    });
  });
  call.on('end', () => {
    ended = true;
    finish();
  });
  call.on('error', () => undefined);
}
