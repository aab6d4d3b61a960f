/**
 * `make bench-fullscale`: the full-scale rehearsal of the coordinator, every service a separate
 * process on this machine, on the reference's data set (../shared/upstream/data).
 *
 * Leg 1: the whole reference workload (275 roles + default, 5 prompts x 240 questions: 331,200
 * items; activations [46, 4608] bf16) with the synthetic backend at full speed, the test judge
 * server answering at once, and the real aggregation service. Reports items/s end to end, the
 * peak RSS of each process, and whether the coordinator's memory stayed flat (its RSS sampled
 * from a fifth of the run to the end).
 *
 * Leg 2: about 20,000 items with generation paced at 80 items/s (an 8-GPU node) and the judge
 * server at the judge benchmark's latency (lognormal, median 700 ms, sigma 1.0; judge
 * concurrency 200, no rate limit): the wall time against generation alone (items / 80 per s).
 *
 * AXIS_FULLSCALE_ROLES (leg 1's judged roles, default 275), AXIS_FULLSCALE_QUESTIONS (per role,
 * default 240) and AXIS_FULLSCALE_LEG2_ITEMS (default 20000) make it smaller;
 * test/e2e/fullscale.test.ts runs a small version.
 * AXIS_FULLSCALE_NODE_OPTIONS is given to the services as NODE_OPTIONS (e.g. `--require` of a
 * script that starts the inspector's CPU profiler and writes the profile on exit).
 * Ends with `result:` lines; numbers go to docs/PERFORMANCE.md.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Run } from '../gen/assistant_axis/v1/coordinator';
import { RunState } from '../gen/assistant_axis/v1/coordinator';
import type { LocalStack, ServiceName } from '../services/cli/stack';
import { coordinatorClient, getRun, startRun, watchRun } from '../services/cli/client';
import { FakeOpenAIServer } from '../test/doubles/openai-server';
import { testStack, UPSTREAM_DATA } from '../test/kit/stack';

const LAYERS = 46;
const HIDDEN = 4608;
/** Questions per role: 240 in the reference; fewer make a run with every role short (its end is what it shows). */
const QUESTIONS = Number(process.env.AXIS_FULLSCALE_QUESTIONS ?? 240);
const PER_ROLE = 5 * QUESTIONS;
/** The reference's min_count (50 of 1,200 items), scaled with the questions. */
const MIN_COUNT = Math.max(1, Math.round((50 * QUESTIONS) / 240));
const SERVICES: ServiceName[] = ['coordinator', 'inference', 'judge', 'aggregation'];

function lognormal(median: number, sigma: number): () => number {
  return () => median * Math.exp(sigma * Math.sqrt(-2 * Math.log(1 - Math.random())) * Math.cos(2 * Math.PI * Math.random()));
}

/** CPU seconds (user + system) a process has used, from /proc. */
function cpuSeconds(pid: number): number {
  const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks (100/s)
}

/** VmRSS and VmHWM (peak) of a process, MiB, from /proc. */
function memory(pid: number): { rss: number; peak: number } {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? 0);
  return { rss: kb('VmRSS') / 1024, peak: kb('VmHWM') / 1024 };
}

function judgedRoles(count: number): string[] {
  const all = fs.readdirSync(path.join(UPSTREAM_DATA, 'roles', 'instructions')).filter((f) => f.endsWith('.json')).map((f) => f.slice(0, -5)).filter((r) => !r.includes('default')).sort();
  if (count > all.length) throw new Error(`the reference set has ${all.length} judged roles, ${count} asked for`);
  return all.slice(0, count);
}

export interface LegResult {
  items: number;
  seconds: number;
  state: string;
  peakMiB: Record<ServiceName, number>;
  cpuSeconds: Record<ServiceName | 'driver', number>;
  /** The coordinator's RSS (MiB) sampled from a fifth of the run to its end. */
  coordinatorRss: number[];
}

export async function runLeg(name: string, opts: { roles: string[]; itemsPerSecond: number; judgeLatency?: () => number; log: (s: string) => void }): Promise<LegResult> {
  const server = new FakeOpenAIServer({ latencyMs: opts.judgeLatency });
  await server.start();
  let stack: LocalStack | undefined;
  try {
    ({ stack } = await testStack(`fullscale-${name}`, {
      dataDir: UPSTREAM_DATA,
      args: {
        inference: ['--synthetic-layers', String(LAYERS), '--synthetic-hidden', String(HIDDEN), '--activation-dtype', 'bf16', '--capacity', '64', '--synthetic-items-per-second', String(opts.itemsPerSecond)],
        judge: ['--provider', 'openai', '--base-url', server.baseUrl, '--model', 'gpt-4.1-mini', '--concurrency', '200'],
        coordinator: ['--judge-concurrency', '200'],
      },
      env: { OPENAI_API_KEY: 'sk-fullscale', AXIS_LOG_LEVEL: 'warn', ...(process.env.AXIS_FULLSCALE_NODE_OPTIONS ? { NODE_OPTIONS: process.env.AXIS_FULLSCALE_NODE_OPTIONS } : {}) },
    }));
    await stack.startAll(60_000);
    const pids = Object.fromEntries(SERVICES.map((s) => [s, stack!.processes.get(s)!.child.pid!])) as Record<ServiceName, number>;
    const client = coordinatorClient(stack.address('coordinator'));
    const items = (opts.roles.length + 1) * PER_ROLE;
    opts.log(`${name}: ${items} items (${opts.roles.length} roles + default), generation ${opts.itemsPerSecond ? `${opts.itemsPerSecond} items/s` : 'unlimited'}`);
    const started = performance.now();
    await startRun(client, { name, roles: [...opts.roles, 'default'], questionCount: QUESTIONS, minCount: MIN_COUNT });
    const rss: number[] = [];
    let lastLog = 0;
    const sampler = setInterval(() => {
      void getRun(client, name).then((run: Run) => {
        const p = run.progress!;
        if (p.itemsTotal && p.aggregated >= p.itemsTotal / 5) rss.push(memory(pids.coordinator).rss);
        if (performance.now() - lastLog > 30_000) {
          lastLog = performance.now();
          opts.log(`  ${p.aggregated}/${p.itemsTotal} aggregated, ${p.itemsPerSecond.toFixed(0)} items/s, coordinator ${memory(pids.coordinator).rss.toFixed(0)} MiB`);
        }
      }, () => undefined);
    }, 2000);
    const final = await watchRun(client, name, () => undefined);
    clearInterval(sampler);
    const seconds = (performance.now() - started) / 1000;
    const peakMiB = Object.fromEntries(SERVICES.map((s) => [s, memory(pids[s]).peak])) as Record<ServiceName, number>;
    const cpu = { ...Object.fromEntries(SERVICES.map((s) => [s, cpuSeconds(pids[s])])), driver: cpuSeconds(process.pid) } as Record<ServiceName | 'driver', number>;
    client.close();
    return { items: Number(final.progress!.aggregated), seconds, state: RunState[final.state], peakMiB, cpuSeconds: cpu, coordinatorRss: rss };
  } finally {
    await stack?.stopAll();
    await server.stop();
  }
}

/** Flat: after the first fifth, the coordinator's RSS never rose more than 25% (and 64 MiB) above its first sample. */
export function memoryFlat(samples: number[]): boolean {
  if (samples.length < 2) return true;
  const first = samples[0];
  return Math.max(...samples) - first <= Math.max(64, first * 0.25);
}

async function main(): Promise<void> {
  const log = (s: string) => process.stdout.write(s + '\n');
  const roles1 = Number(process.env.AXIS_FULLSCALE_ROLES ?? 275);
  const items2 = Number(process.env.AXIS_FULLSCALE_LEG2_ITEMS ?? 20000);
  const leg1 = await runLeg('leg1', { roles: judgedRoles(roles1), itemsPerSecond: 0, log });
  if (leg1.state !== 'RUN_STATE_SUCCEEDED' || leg1.items !== (roles1 + 1) * PER_ROLE) throw new Error(`leg 1 ended ${leg1.state} with ${leg1.items} items`);
  const perSecond = leg1.items / leg1.seconds;
  log(`leg 1: ${leg1.items} items in ${leg1.seconds.toFixed(0)} s: ${perSecond.toFixed(1)} items/s end to end`);
  log(`leg 1: peak RSS ${SERVICES.map((s) => `${s} ${leg1.peakMiB[s].toFixed(0)} MiB`).join(', ')}`);
  log(`leg 1: CPU seconds ${Object.entries(leg1.cpuSeconds).map(([k, v]) => `${k} ${v.toFixed(0)}`).join(', ')} (the driver hosts the judge test server); ${(leg1.seconds * 2).toFixed(0)} core-seconds were available`);
  log(`leg 1: coordinator RSS from 20% to the end: ${leg1.coordinatorRss.length ? `${Math.min(...leg1.coordinatorRss).toFixed(0)}..${Math.max(...leg1.coordinatorRss).toFixed(0)} MiB` : 'no samples'}`);

  const rate = 80;
  const roles2 = Math.max(1, Math.round(items2 / PER_ROLE) - 1);
  const leg2 = await runLeg('leg2', { roles: judgedRoles(roles2), itemsPerSecond: rate, judgeLatency: lognormal(700, 1.0), log });
  if (leg2.state !== 'RUN_STATE_SUCCEEDED') throw new Error(`leg 2 ended ${leg2.state}`);
  const generationAlone = leg2.items / rate;
  log(`leg 2: ${leg2.items} items in ${leg2.seconds.toFixed(1)} s; generation alone at ${rate} items/s: ${generationAlone.toFixed(1)} s`);

  process.stdout.write(`result: coordinator_items_per_s = ${perSecond.toFixed(1)} items/s\n`);
  process.stdout.write(`result: wall_over_generation = ${(leg2.seconds / generationAlone).toFixed(3)} x\n`);
  for (const s of SERVICES) process.stdout.write(`result: peak_rss_${s} = ${leg1.peakMiB[s].toFixed(0)} MiB\n`);
  process.stdout.write(`result: coordinator_memory_flat = ${memoryFlat(leg1.coordinatorRss) ? 1 : 0}\n`);
}

if (require.main === module) {
  main().catch((err) => {
    process.stderr.write(`bench-fullscale: ${(err as Error).stack ?? err}\n`);
    process.exit(1);
  });
}
