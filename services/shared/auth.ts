import * as grpc from '@grpc/grpc-js';
import { timingSafeEqual } from 'node:crypto';
import * as fs from 'node:fs';

/**
 * Bearer tokens between the system's parts: the one every Coordinator call carries (from
 * clients), and one per internal service, which only the coordinator and that service hold
 * (the coordinator presents it on every call; the service takes no call without it).
 */

/** A token read from its file (at least 16 characters); `flag` names the option in errors. */
export function readToken(file: string, flag = '--auth-token-file'): string {
  let token: string;
  try {
    token = fs.readFileSync(file, 'utf8').trim();
  } catch (err) {
    throw new Error(`${flag}: cannot read ${file} (${(err as NodeJS.ErrnoException).code})`);
  }
  if (token.length < 16) throw new Error(`${flag}: the token must be at least 16 characters`);
  return token;
}

/** Constant-time comparison of the call's bearer token with the configured one. */
export function bearerMatches(metadata: grpc.Metadata, token: string): boolean {
  return bearerHeaderMatches(metadata.get('authorization')[0], token);
}

/** Constant-time comparison of an authorization header's bearer token (gRPC metadata or HTTP) with the configured one. */
export function bearerHeaderMatches(header: unknown, token: string): boolean {
  if (typeof header !== 'string' || !header.startsWith('Bearer ')) return false;
  const given = Buffer.from(header.slice('Bearer '.length));
  const expected = Buffer.from(token);
  return given.length === expected.length && timingSafeEqual(given, expected);
}

/** What a call without the token is told (the token itself is never echoed). */
export const UNAUTHENTICATED_DETAILS = 'authorization: this coordinator requires "authorization: Bearer <token>" metadata';

/** What a call to an internal service without its caller token is told. */
export const NOT_THE_COORDINATOR_DETAILS = 'authorization: this service takes calls from the coordinator only (its caller token is missing or wrong)';

/**
 * Refuses a call to the services under `pathPrefix` (e.g. "/assistant_axis.v1.CoordinatorService/")
 * that does not carry the token, on its metadata, before its message is read or decoded: a
 * stranger makes the service allocate nothing. Health and reflection stay open for probes.
 */
export function bearerInterceptor(token: string, pathPrefix: string, details = UNAUTHENTICATED_DETAILS): grpc.ServerInterceptor {
  return (method, call) =>
    new grpc.ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMetadata: (metadata, pass) => {
            if (method.path.startsWith(pathPrefix) && !bearerMatches(metadata, token)) {
              call.sendStatus({ code: grpc.status.UNAUTHENTICATED, details });
              return;
            }
            pass(metadata);
          },
        }),
    });
}

/** A client interceptor that presents `token` on every call of a channel (the coordinator's to one internal service). */
export function presentToken(token: string): grpc.Interceptor {
  return (options, nextCall) =>
    new grpc.InterceptingCall(nextCall(options), {
      start: (metadata, listener, next) => {
        metadata.set('authorization', `Bearer ${token}`);
        next(metadata, listener);
      },
    });
}

/** The option every internal service takes: the token its caller (the coordinator) must present. */
export const CALLER_TOKEN_OPTION = {
  'caller-token-file': {
    type: 'string',
    env: 'AXIS_CALLER_TOKEN_FILE',
    default: '',
    help: 'file holding the token the coordinator presents on every call; calls without it are refused (empty: any caller the network lets in, for local use)',
  },
} as const;

/** The interceptors of an internal service's server: its caller token checked on every call to `service` ("assistant_axis.v1.JudgeService"). */
export function callerInterceptors(file: string, service: string): grpc.ServerInterceptor[] {
  return file ? [bearerInterceptor(readToken(file, '--caller-token-file'), `/${service}/`, NOT_THE_COORDINATOR_DETAILS)] : [];
}
