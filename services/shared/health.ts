import * as grpc from '@grpc/grpc-js';
import * as net from 'node:net';
import { service as healthService } from 'grpc-health-check';

const HealthClient = grpc.makeGenericClientConstructor(healthService, 'Health');

/** Asks a service's grpc.health.v1 Check; resolves to its status name, or 'UNREACHABLE'. */
export function checkHealth(address: string, service = '', timeoutMs = 1000, credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure()): Promise<string> {
  const client = new HealthClient(address, credentials);
  return new Promise((resolve) => {
    client.check({ service }, { deadline: new Date(Date.now() + timeoutMs) }, (err: grpc.ServiceError | null, res: { status: string | number }) => {
      client.close();
      if (err) resolve('UNREACHABLE');
      else resolve(typeof res.status === 'number' ? ['UNKNOWN', 'SERVING', 'NOT_SERVING', 'SERVICE_UNKNOWN'][res.status] : res.status);
    });
  });
}

/**
 * Whether something listens at `host:port`. Connecting to a local port nobody listens on can
 * connect the socket to itself (TCP's simultaneous open, when the kernel picks that very port as
 * the source, which on loopback it then keeps picking): such a socket holds the port, and the
 * service starting there fails with EADDRINUSE. It is reset at once (no TIME_WAIT) and counts as
 * nothing listening. `localPort` forces the source port (tests).
 */
export function probeListening(address: string, localPort?: number): Promise<'listening' | 'closed' | 'self'> {
  const at = address.lastIndexOf(':');
  const host = address.slice(0, at).replace(/^\[|\]$/g, '');
  const port = Number(address.slice(at + 1));
  return new Promise((resolve) => {
    const socket = net.connect({ host, port, ...(localPort ? { localPort, localAddress: host } : {}) });
    socket.once('connect', () => {
      const self = socket.localPort === socket.remotePort && socket.localAddress === socket.remoteAddress;
      if (self) socket.resetAndDestroy();
      else socket.destroy();
      resolve(self ? 'self' : 'listening');
    });
    socket.once('error', () => resolve('closed'));
  });
}

/**
 * Waits until the service reports SERVING; throws after `timeoutMs` with the last status seen.
 * The health check (a gRPC channel, which would hold a self-connection) is asked only once the
 * port has a listener.
 */
export async function waitServing(address: string, timeoutMs: number, isAlive: () => boolean = () => true, credentials?: grpc.ChannelCredentials): Promise<void> {
  const until = Date.now() + timeoutMs;
  let last = 'UNREACHABLE';
  while (Date.now() < until) {
    last = (await probeListening(address)) === 'listening' ? await checkHealth(address, '', 1000, credentials) : 'UNREACHABLE (nothing listens yet)';
    if (last === 'SERVING') return;
    if (!isAlive()) throw new Error(`${address}: the process exited before it was ready`);
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${address}: not ready after ${timeoutMs} ms (last health status ${last})`);
}
