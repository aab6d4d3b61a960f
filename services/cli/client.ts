import * as grpc from '@grpc/grpc-js';
import {CoordinatorServiceClient, Run, RunState, StartRunRequest, CoordinatorServiceProjectConversationRequest, CoordinatorServiceProjectConversationResponse} from '../../gen/assistant_axis/v1/coordinator';
import { channelOptions } from '../shared/server';

export function coordinatorClient(address: string, credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure()): CoordinatorServiceClient {
  return new CoordinatorServiceClient(address, credentials, channelOptions());
}

/** Call metadata carrying the coordinator's bearer token, when it requires one. */
/**
 * Whether a `host:port` address (or a bare host) names this machine: localhost, 127.0.0.0/8
 * or ::1 (a `kubectl port-forward` listens there). A bearer token sent in plaintext anywhere
 * else can be read on the way.
 */
export function isLoopbackAddress(address: string): boolean {
  const target = address.replace(/^dns:(\/\/\/)?/, '');
  const bracketed = /^\[([^\]]+)\](?::\d+)?$/.exec(target);
  const host = bracketed ? bracketed[1] : target.split(':').length > 2 ? target : target.replace(/:\d+$/, '');
  const name = host.toLowerCase();
  return name === 'localhost' || name === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(name);
}

export function authMetadata(token?: string): grpc.Metadata {
  const m = new grpc.Metadata();
  if (token) m.set('authorization', `Bearer ${token}`);
  return m;
}

export function startRun(client: CoordinatorServiceClient, req: Partial<StartRunRequest>, metadata = new grpc.Metadata()): Promise<Run> {
  return new Promise((resolve, reject) => client.startRun(StartRunRequest.fromPartial(req), metadata, (err, res) => (err ? reject(err) : resolve(res))));
}

export function getRun(client: CoordinatorServiceClient, name: string, metadata = new grpc.Metadata()): Promise<Run> {
  return new Promise((resolve, reject) => client.getRun({ name }, metadata, (err, res) => (err ? reject(err) : resolve(res))));
}

export function listRuns(client: CoordinatorServiceClient, metadata = new grpc.Metadata()): Promise<Run[]> {
  return new Promise((resolve, reject) => client.listRuns({}, metadata, (err, res) => (err ? reject(err) : resolve(res.runs))));
}

export function cancelRun(client: CoordinatorServiceClient, name: string, metadata = new grpc.Metadata()): Promise<Run> {
  return new Promise((resolve, reject) => client.cancelRun({ name }, metadata, (err, res) => (err ? reject(err) : resolve(res))));
}

export function deleteRun(client: CoordinatorServiceClient, name: string, metadata = new grpc.Metadata()): Promise<void> {
  return new Promise((resolve, reject) => client.deleteRun({ name }, metadata, (err) => (err ? reject(err) : resolve())));
}

export function projectConversation(client: CoordinatorServiceClient, req: CoordinatorServiceProjectConversationRequest, metadata = new grpc.Metadata()): Promise<CoordinatorServiceProjectConversationResponse> {
  return new Promise((resolve, reject) => client.projectConversation(req, metadata, (err, res) => (err ? reject(err) : resolve(res))));
}

/** A stream lost to the network (a port-forward that dropped, a coordinator restarting), worth opening again. */
const RECONNECTABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.INTERNAL, grpc.status.UNKNOWN]);

/**
 * Follows a run to its end like `watchRun`, opening the stream again when the connection drops
 * (backing off up to 5 s), for at most `reconnectSeconds` without an update.
 */
export async function followRun(client: CoordinatorServiceClient, name: string, onUpdate: (run: Run) => void, metadata: grpc.Metadata, opts: { reconnectSeconds: number; onReconnect?: (err: grpc.ServiceError, attempt: number) => void }): Promise<Run> {
  let heard = Date.now();
  let delay = 250;
  for (let attempt = 1; ; attempt++) {
    try {
      return await watchRun(client, name, (run) => {
        heard = Date.now();
        delay = 250;
        onUpdate(run);
      }, metadata);
    } catch (err) {
      const e = err as grpc.ServiceError;
      if (!RECONNECTABLE.has(e.code) || Date.now() - heard > opts.reconnectSeconds * 1000) throw err;
      opts.onReconnect?.(e, attempt);
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(5000, delay * 2);
    }
  }
}

/** Follows WatchRun until the run ends; resolves with the last state seen. */
export function watchRun(client: CoordinatorServiceClient, name: string, onUpdate: (run: Run) => void, metadata = new grpc.Metadata()): Promise<Run> {
  return new Promise((resolve, reject) => {
    let last: Run | undefined;
    const call = client.watchRun({ name }, metadata);
    call.on('data', (run: Run) => {
      last = run;
      onUpdate(run);
    });
    call.on('error', reject);
    call.on('end', () => (last ? resolve(last) : reject(new Error('WatchRun ended without an update'))));
  });
}

export function stateName(state: RunState): string {
  return RunState[state]?.replace('RUN_STATE_', '') ?? String(state);
}

