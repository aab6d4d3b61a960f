import * as grpc from '@grpc/grpc-js';
import { CoordinatorServiceClient, Run, StartRunRequest } from '../../gen/assistant_axis/v1/coordinator';
import { coordinatorClient, getRun, startRun, watchRun } from '../../services/cli/client';

export { coordinatorClient, getRun, startRun, watchRun };

/** StartRun that resolves with the gRPC error instead of throwing. */
export async function startRunError(client: CoordinatorServiceClient, req: Partial<StartRunRequest>): Promise<grpc.ServiceError> {
  try {
    const run: Run = await startRun(client, req);
    throw new Error(`expected an error, got run ${run.name} in state ${run.state}`);
  } catch (err) {
    if (typeof (err as grpc.ServiceError).code !== 'number') throw err;
    return err as grpc.ServiceError;
  }
}

export async function waitFor<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs = 60_000): Promise<T> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
