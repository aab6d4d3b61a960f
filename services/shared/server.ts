import * as grpc from '@grpc/grpc-js';
import type * as http from 'node:http';
import { HealthImplementation, ServingStatus } from 'grpc-health-check';
import { ReflectionService } from '@grpc/reflection';
import type { Registry } from 'prom-client';
import { DRAIN_SECONDS, KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS, MAX_CONCURRENT_STREAMS, MAX_MESSAGE_BYTES } from './defaults';
import type { Logger } from './logger';
import { reflectionPackageDefinition } from './protos';
import { grpcServerMetrics, startMetricsServer } from './metrics';
import { tolerantDecoding, tolerantServer } from './rpc';
import { serverCredentials, TlsConfig } from './tls';

export interface ServiceBinding {
  /** Fully qualified name, e.g. "assistant_axis.v1.JudgeService": also its name in the health service. */
  name: string;
  definition: grpc.ServiceDefinition;
  implementation: grpc.UntypedServiceImplementation;
}

export interface StartOptions {
  service: string;
  host: string;
  port: number;
  metricsPort: number;
  bindings: ServiceBinding[];
  registry: Registry;
  log: Logger;
  /** Called on SIGTERM/SIGINT before the server stops taking calls (e.g. cancel streams, flush). */
  onDrain?: () => Promise<void> | void;
  /** TLS (and mutual TLS) settings; plaintext without them. */
  tls?: TlsConfig;
  /** The largest message a call may send (default MAX_MESSAGE_BYTES, what the internal services need). */
  maxReceiveBytes?: number;
  /** Run before a call's message is read (e.g. authentication on its metadata). */
  interceptors?: grpc.ServerInterceptor[];
}

export interface RunningService {
  server: grpc.Server;
  health: HealthImplementation;
  port: number;
  metricsPort: number;
  /** Marks the whole service (and each of its gRPC services) serving or not. */
  setReady(ready: boolean): void;
  stop(): Promise<void>;
}

export function serverOptions(maxReceiveBytes = MAX_MESSAGE_BYTES, interceptors: grpc.ServerInterceptor[] = []): grpc.ServerOptions {
  return {
    'grpc.max_receive_message_length': maxReceiveBytes,
    interceptors,
    'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    // A client that vanished without closing its connection: its streams are cancelled, and what it held is freed.
    'grpc.keepalive_time_ms': KEEPALIVE_TIME_MS,
    'grpc.keepalive_timeout_ms': KEEPALIVE_TIMEOUT_MS,
    'grpc.max_concurrent_streams': MAX_CONCURRENT_STREAMS,
  };
}

/**
 * Starts a service the way every service starts: its gRPC services plus grpc.health.v1 and
 * reflection on one port, Prometheus metrics on another, readiness NOT_SERVING until the
 * service says otherwise, and a graceful drain on SIGTERM/SIGINT.
 */
export async function startService(opts: StartOptions): Promise<RunningService> {
  const { log } = opts;
  const server = new grpc.Server(serverOptions(opts.maxReceiveBytes, [grpcServerMetrics(opts.registry), ...(opts.interceptors ?? [])]));
  const initial: Record<string, ServingStatus> = { '': 'NOT_SERVING' };
  for (const b of opts.bindings) initial[b.name] = 'NOT_SERVING';
  const health = new HealthImplementation(initial);
  // The libraries' services decode tolerantly too: bytes that are not their request get INVALID_ARGUMENT, and a reflection stream ends at once.
  health.addToServer(tolerantServer(server));
  // Each service describes what it serves, not every service of the package.
  new ReflectionService(reflectionPackageDefinition(), { services: [...opts.bindings.map((b) => b.name), 'grpc.health.v1.Health'] }).addToServer(tolerantServer(server));
  for (const b of opts.bindings) {
    const tolerant = tolerantDecoding(b.definition, b.implementation);
    server.addService(tolerant.definition, tolerant.implementation);
  }

  const { credentials, mode } = opts.tls ? serverCredentials(opts.tls) : { credentials: grpc.ServerCredentials.createInsecure(), mode: 'plaintext' };
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(`${opts.host}:${opts.port}`, credentials, (err, bound) => (err ? reject(err) : resolve(bound)));
  });
  log.info({ transport: mode }, mode === 'plaintext' ? 'gRPC in plaintext (no --tls-cert)' : mode === 'mtls' ? 'gRPC over mutual TLS' : 'gRPC over TLS');
  // Probes: the kubelet's gRPC probe speaks plaintext only, so with TLS the health service is also
  // served alone on its own plaintext port (it tells nothing but "serving or not").
  let healthServer: grpc.Server | undefined;
  const healthPort = opts.tls?.['health-port'] ?? 0;
  if (healthPort > 0) {
    healthServer = new grpc.Server();
    health.addToServer(tolerantServer(healthServer));
    await new Promise<number>((resolve, reject) => healthServer!.bindAsync(`${opts.host}:${healthPort}`, grpc.ServerCredentials.createInsecure(), (err, bound) => (err ? reject(err) : resolve(bound))));
    log.info({ healthPort }, 'health checks in plaintext on their own port');
  }
  let metrics: http.Server | undefined;
  try {
    metrics = await startMetricsServer(opts.registry, opts.metricsPort, opts.host);
  } catch (err) {
    server.forceShutdown();
    throw err;
  }
  const address = metrics.address();
  const metricsPort = typeof address === 'object' && address ? address.port : opts.metricsPort;
  log.info({ port, metricsPort, host: opts.host }, `${opts.service} listening`);

  const setReady = (ready: boolean) => {
    const status: ServingStatus = ready ? 'SERVING' : 'NOT_SERVING';
    health.setStatus('', status);
    for (const b of opts.bindings) health.setStatus(b.name, status);
  };

  let stopping: Promise<void> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      log.info('draining');
      setReady(false);
      try {
        await opts.onDrain?.();
      } catch (err) {
        log.error({ err }, 'drain hook failed');
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          log.warn(`calls still open after ${DRAIN_SECONDS}s: forcing shutdown`);
          server.forceShutdown();
          resolve();
        }, DRAIN_SECONDS * 1000);
        healthServer?.forceShutdown();
        server.tryShutdown(() => {
          clearTimeout(timer);
          resolve();
        });
      });
      await new Promise<void>((resolve) => metrics!.close(() => resolve()));
      log.info('stopped');
    })());

  const onSignal = (signal: string) => {
    log.info({ signal }, 'signal received');
    stop().then(() => process.exit(0));
  };
  process.once('SIGTERM', () => onSignal('SIGTERM'));
  process.once('SIGINT', () => onSignal('SIGINT'));

  return { server, health, port, metricsPort, setReady, stop };
}

/** A client channel with the same deliberate message-size bound as the servers, and keepalive (see defaults.ts). */
export function channelOptions(): grpc.ChannelOptions {
  return {
    'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
    'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    'grpc.keepalive_time_ms': KEEPALIVE_TIME_MS,
    'grpc.keepalive_timeout_ms': KEEPALIVE_TIMEOUT_MS,
    'grpc.keepalive_permit_without_calls': 1,
  };
}

/** Runs a service's main and exits non-zero with a clear message if it cannot start. */
export function runMain(service: string, main: () => Promise<unknown>): void {
  main().catch((err) => {
    process.stderr.write(`${service}: ${(err as Error)?.message ?? String(err)}\n`);
    process.exit(1);
  });
}
