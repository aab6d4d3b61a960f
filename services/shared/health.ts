import * as grpc from '@grpc/grpc-js';
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

/** Waits until the service reports SERVING; throws after `timeoutMs` with the last status seen. */
export async function waitServing(address: string, timeoutMs: number, isAlive: () => boolean = () => true, credentials?: grpc.ChannelCredentials): Promise<void> {
  const until = Date.now() + timeoutMs;
  let last = 'UNREACHABLE';
  while (Date.now() < until) {
    last = await checkHealth(address, '', 1000, credentials);
    if (last === 'SERVING') return;
    if (!isAlive()) throw new Error(`${address}: the process exited before it was ready`);
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${address}: not ready after ${timeoutMs} ms (last health status ${last})`);
}
