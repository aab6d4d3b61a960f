import type * as grpc from '@grpc/grpc-js';
import { ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DEFAULT_METRICS_PORTS, DEFAULT_PORTS, NODE_FLAGS } from '../shared/defaults';
import { waitServing } from '../shared/health';

export type ServiceName = 'inference' | 'judge' | 'aggregation' | 'coordinator';
export const SERVICE_NAMES: ServiceName[] = ['inference', 'judge', 'aggregation', 'coordinator'];

export interface StackOptions {
  /** Repository root (holds dist/). */
  root: string;
  host?: string;
  ports?: Partial<Record<ServiceName, number>>;
  metricsPorts?: Partial<Record<ServiceName, number>>;
  /** Directory for the services' log files. */
  logDir: string;
  /** State of the stateful services: `<stateDir>/coordinator` (ledger) and `<stateDir>/aggregation` (journal, checkpoints). */
  stateDir: string;
  outputRoot: string;
  dataDir: string;
  /** Extra flags per service (e.g. synthetic sizes, the judge's base URL). */
  args?: Partial<Record<ServiceName, string[]>>;
  env?: NodeJS.ProcessEnv;
  /** Detach the processes so they outlive this one (`make up`). */
  detached?: boolean;
  /** How to reach the services' health checks when they serve TLS. */
  clientCredentials?: grpc.ChannelCredentials;
}

export interface StackProcess {
  name: ServiceName;
  address: string;
  child: ChildProcess;
  logFile: string;
}

/** The local (no-cluster) deployment: the four services as separate processes on loopback. */
export class LocalStack {
  readonly processes = new Map<ServiceName, StackProcess>();
  readonly host: string;
  readonly ports: Record<ServiceName, number>;
  readonly metricsPorts: Record<ServiceName, number>;

  constructor(readonly opts: StackOptions) {
    this.host = opts.host ?? '127.0.0.1';
    this.ports = { ...DEFAULT_PORTS, ...opts.ports };
    this.metricsPorts = { ...DEFAULT_METRICS_PORTS, ...opts.metricsPorts };
  }

  address(name: ServiceName): string {
    return `${this.host}:${this.ports[name]}`;
  }

  flags(name: ServiceName): string[] {
    const common = ['--host', this.host, '--port', String(this.ports[name]), '--metrics-port', String(this.metricsPorts[name])];
    const extra = this.opts.args?.[name] ?? [];
    if (name === 'aggregation') return [...common, '--state-dir', path.join(this.opts.stateDir, 'aggregation'), ...extra];
    if (name !== 'coordinator') return [...common, ...extra];
    return [
      ...common,
      '--inference', this.address('inference'),
      '--judge', this.address('judge'),
      '--aggregation', this.address('aggregation'),
      '--state-dir', path.join(this.opts.stateDir, 'coordinator'),
      '--output-root', this.opts.outputRoot,
      '--data-dir', this.opts.dataDir,
      ...extra,
    ];
  }

  /** Starts one service and waits until its health service says SERVING. */
  async start(name: ServiceName, timeoutMs = 30_000): Promise<StackProcess> {
    fs.mkdirSync(this.opts.logDir, { recursive: true });
    const logFile = path.join(this.opts.logDir, `${name}.log`);
    const fd = fs.openSync(logFile, 'a');
    const entry = path.join(this.opts.root, 'dist', 'services', name, 'main.js');
    if (!fs.existsSync(entry)) throw new Error(`${entry} is missing: run \`make build\` first`);
    const child = spawn(process.execPath, [...NODE_FLAGS, entry, ...this.flags(name)], {
      cwd: this.opts.root,
      env: { ...process.env, ...this.opts.env },
      stdio: ['ignore', fd, fd],
      detached: this.opts.detached ?? false,
    });
    fs.closeSync(fd);
    if (this.opts.detached) child.unref();
    const proc = { name, address: this.address(name), child, logFile };
    this.processes.set(name, proc);
    let exited = false;
    child.once('exit', () => (exited = true));
    try {
      await waitServing(proc.address, timeoutMs, () => !exited, this.opts.clientCredentials);
    } catch (err) {
      throw new Error(`${name} did not start: ${(err as Error).message}; see ${logFile}:\n${tail(logFile)}`);
    }
    return proc;
  }

  async startAll(timeoutMs = 30_000): Promise<void> {
    await Promise.all((['inference', 'judge', 'aggregation'] as ServiceName[]).map((n) => this.start(n, timeoutMs)));
    await this.start('coordinator', timeoutMs);
  }

  /** SIGTERM (graceful drain), then SIGKILL after `graceMs`. */
  async stop(name: ServiceName, graceMs = 15_000): Promise<void> {
    const p = this.processes.get(name);
    if (!p) return;
    this.processes.delete(name);
    await stopChild(p.child, graceMs);
  }

  kill9(name: ServiceName): Promise<void> {
    const p = this.processes.get(name);
    if (!p) return Promise.resolve();
    this.processes.delete(name);
    return stopChild(p.child, 0);
  }

  async stopAll(): Promise<void> {
    // The coordinator first, so it stops sending before the others go.
    await this.stop('coordinator');
    await Promise.all([...this.processes.keys()].map((n) => this.stop(n)));
  }
}

function stopChild(child: ChildProcess, graceMs: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    child.once('exit', () => resolve());
    if (graceMs <= 0) {
      child.kill('SIGKILL');
      return;
    }
    child.kill('SIGTERM');
    setTimeout(() => child.kill('SIGKILL'), graceMs).unref();
  });
}

function tail(file: string, lines = 15): string {
  try {
    return fs.readFileSync(file, 'utf8').trim().split('\n').slice(-lines).join('\n');
  } catch {
    return '(no log)';
  }
}
