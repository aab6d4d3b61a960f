import * as grpc from '@grpc/grpc-js';
import { CoordinatorServiceServer, Run, RunState } from '../../gen/assistant_axis/v1/coordinator';
import type { Logger } from '../shared/logger';
import { failStream, RpcError, unary, writeWhenReady } from '../shared/rpc';
import { bearerMatches, UNAUTHENTICATED_DETAILS } from '../shared/auth';
import { artifactChunks, artifactFile, listArtifacts } from './artifacts';
import { projectConversation } from './projection';
import type { RunManager } from './runManager';
import type { InferencePool } from './upstreams';

/** At most one WatchRun update per this many milliseconds, and always the latest state. */
const WATCH_INTERVAL_MS = 200;

/**
 * The Coordinator's gRPC adapter over the RunManager (the transport-agnostic logic that tests
 * call without a network). Every call carries the bearer token when one is configured; health
 * and reflection stay open for probes.
 */
export function coordinatorGrpcHandlers(runs: RunManager, opts: { token?: string; log: Logger; inference: InferencePool; dataRoots: string[] }): CoordinatorServiceServer {
  const authorize = (call: { metadata: grpc.Metadata }) => {
    // Also refused earlier, before the message is read, by `bearerInterceptor` on the server.
    if (opts.token && !bearerMatches(call.metadata, opts.token)) throw new RpcError(grpc.status.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS);
  };
  const guarded = <Req, Res>(handler: (req: Req) => Promise<Res>) =>
    unary<Req, Res>(opts.log, async (req, call) => {
      authorize(call);
      return handler(req);
    });

  return {
    startRun: guarded((req) => runs.start(req)),
    getRun: guarded(async (req) => runs.get(req.name)),
    listRuns: guarded(async () => ({ runs: runs.list() })),
    cancelRun: guarded(async (req) => runs.cancel(req.name)),
    deleteRun: guarded(async (req) => {
      await runs.delete(req.name);
      return {};
    }),
    projectConversation: guarded((req) => projectConversation(req, { runs, inference: opts.inference, dataRoots: opts.dataRoots })),
    listArtifacts: guarded(async (req) => ({ artifacts: await listArtifacts(runs.get(req.run).outputDir) })),
    getArtifact: (call) => {
      void (async () => {
        try {
          authorize(call);
          const { file, size } = await artifactFile(runs.get(call.request.run).outputDir, call.request.path);
          for await (const chunk of artifactChunks(file, size, Number(call.request.offset))) {
            if (!(await writeWhenReady(call, chunk))) return;
          }
          call.end();
        } catch (err) {
          failStream(call, err);
        }
      })();
    },
    watchRun: (call) => {
      try {
        authorize(call);
        runs.get(call.request.name);
      } catch (err) {
        failStream(call, err);
        return;
      }
      const name = call.request.name;
      const unsubscribe = watchThrottled(runs, name, (run) => {
        if (call.cancelled) return false;
        call.write(run);
        if (runs.isTerminal(name) && run.state !== RunState.RUN_STATE_RUNNING) {
          call.end();
          return false;
        }
        return true;
      });
      call.on('cancelled', unsubscribe);
    },
  };
}

/**
 * Sends the run now and whenever it changes, at most once per WATCH_INTERVAL_MS and always the
 * latest state, until `send` returns false. Returns the unsubscribe function.
 */
export function watchThrottled(runs: RunManager, name: string, send: (run: Run) => boolean): () => void {
  let last = 0;
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  const stop = () => {
    stopped = true;
    unsubscribe();
    if (timer) clearTimeout(timer);
  };
  const fire = () => {
    timer = undefined;
    if (stopped) return;
    last = Date.now();
    if (!send(runs.get(name))) stop();
  };
  const unsubscribe = runs.watch(name, () => {
    if (timer || stopped) return;
    timer = setTimeout(fire, Math.max(0, WATCH_INTERVAL_MS - (Date.now() - last)));
  });
  fire();
  return stop;
}
