import * as grpc from '@grpc/grpc-js';
import { timingSafeEqual } from 'node:crypto';
import * as fs from 'node:fs';

/** The bearer token every Coordinator call must carry, read from its file (at least 16 characters). */
export function readToken(file: string): string {
  let token: string;
  try {
    token = fs.readFileSync(file, 'utf8').trim();
  } catch (err) {
    throw new Error(`--auth-token-file: cannot read ${file} (${(err as NodeJS.ErrnoException).code})`);
  }
  if (token.length < 16) throw new Error('--auth-token-file: the token must be at least 16 characters');
  return token;
}

/** Constant-time comparison of the call's bearer token with the configured one. */
export function bearerMatches(metadata: grpc.Metadata, token: string): boolean {
  const header = metadata.get('authorization')[0];
  if (typeof header !== 'string' || !header.startsWith('Bearer ')) return false;
  const given = Buffer.from(header.slice('Bearer '.length));
  const expected = Buffer.from(token);
  return given.length === expected.length && timingSafeEqual(given, expected);
}

/** What a call without the token is told (the token itself is never echoed). */
export const UNAUTHENTICATED_DETAILS = 'authorization: this coordinator requires "authorization: Bearer <token>" metadata';

/**
 * Refuses a call to the services under `pathPrefix` (e.g. "/assistant_axis.v1.Coordinator/")
 * that does not carry the token, on its metadata, before its message is read or decoded: a
 * stranger makes the coordinator allocate nothing. Health and reflection stay open for probes.
 */
export function bearerInterceptor(token: string, pathPrefix: string): grpc.ServerInterceptor {
  return (method, call) =>
    new grpc.ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMetadata: (metadata, pass) => {
            if (method.path.startsWith(pathPrefix) && !bearerMatches(metadata, token)) {
              call.sendStatus({ code: grpc.status.UNAUTHENTICATED, details: UNAUTHENTICATED_DETAILS });
              return;
            }
            pass(metadata);
          },
        }),
    });
}
