/**
 * The soak: a synthetic run during which every service is killed (-9) again and again, the
 * judge API goes down and then rate-limits, and the aggregation's disk fills up and is freed;
 * afterwards every item is in the outputs exactly once, with the scores and (within one float32
 * ulp) the axis of a clean run of the same request. `make soak` runs the long version (each
 * service killed at least 10 times); test/e2e/soak.test.ts a short one (at most 3 minutes).
 *
 * The disk fault needs root (a small tmpfs is mounted under the aggregation's state directory);
 * without it that fault is skipped and the report says so.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { RunState } from '../gen/assistant_axis/v1/coordinator';
import type { ServiceName } from '../services/cli/stack';
import { coordinatorClient, getRun, startRun, watchRun } from '../services/cli/client';
import { FakeOpenAIServer } from '../test/doubles/openai-server';
import { readAxis, readRunFiles, ulpDistance } from '../test/kit/runfiles';
import { testStack } from '../test/kit/stack';

export interface SoakOptions {
  questionCount: number;
  killsPerService: number;
  outageMs: number;
  rateLimitMs: number;
  diskFullMs: number;
  /** Also kill -9 the aggregation while its disk is full, and restart it as a supervisor would (again and again until it serves). */
  killDuringDiskFull?: boolean;
  /** The services killed (default all four). */
  killServices?: ServiceName[];
  log: (s: string) => void;
}

export interface SoakReport {
  items: number;
  lost: number;
  doubled: number;
  scoresDiffer: number;
  axisUlp: number;
  faults: Record<string, number>;
  skipped: string[];
  seconds: number;
}

const SERVICES: ServiceName[] = ['coordinator', 'inference', 'judge', 'aggregation'];
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function soak(opts: SoakOptions): Promise<SoakReport> {
  const api = new FakeOpenAIServer({ latencyMs: () => 5 + Math.random() * 20, retryAfterMs: 200 });
  await api.start();
  const { stack, dir } = await testStack('soak', {
    args: {
      // About 25 items/s: slow enough that the faults land while the run goes on.
      inference: ['--synthetic-tokens-per-second', '200', '--capacity', '8'],
      judge: ['--provider', 'openai', '--base-url', api.baseUrl, '--model', 'judge-soak', '--backoff-ms', '50'],
      aggregation: ['--checkpoint-seconds', '2'],
    },
    env: { OPENAI_API_KEY: 'sk-soak' },
  });
  const skipped: string[] = [];
  const aggregationState = path.join(stack.opts.stateDir, 'aggregation');
  fs.mkdirSync(aggregationState, { recursive: true });
  let tmpfs = false;
  if (opts.diskFullMs > 0) {
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=96m', 'tmpfs', aggregationState], { stdio: 'pipe' });
      tmpfs = true;
    } catch (err) {
      skipped.push(`disk full: a tmpfs could not be mounted (${(err as Error).message.split('\n')[0]}; needs root)`);
    }
  }
  const faults: Record<string, number> = { api_outage: 0, api_rate_limited: 0, disk_full: 0 };
  for (const s of SERVICES) faults[`kill9_${s}`] = 0;
  const started = performance.now();
  const request = { questionCount: opts.questionCount, minCount: 1, seed: 7 };
  try {
    await stack.startAll();
    // The clean run: the same request, no faults.
    let client = coordinatorClient(stack.address('coordinator'));
    await startRun(client, { name: 'clean', ...request });
    const clean = await watchRun(client, 'clean', () => undefined);
    if (clean.state !== RunState.RUN_STATE_SUCCEEDED) throw new Error(`the clean run ended ${RunState[clean.state]}: ${clean.error}`);
    const total = Number(clean.progress!.itemsTotal);
    opts.log(`clean run: ${total} items`);

    await startRun(client, { name: 'soak', ...request });
    const progress = async (): Promise<{ aggregated: number; state: RunState } | undefined> => {
      try {
        const r = await getRun(client, 'soak');
        return { aggregated: Number(r.progress!.aggregated), state: r.state };
      } catch {
        return undefined; // the coordinator is down
      }
    };
    const kills = (opts.killServices ?? SERVICES).flatMap((s) => Array.from({ length: opts.killsPerService }, () => s)).sort(() => Math.random() - 0.5);
    // Fault points spread over the run: kills, then the API outage, 429s and the full disk in between.
    const events: { at: number; run: () => Promise<void> }[] = kills.map((s, i) => ({
      // Spread over the first 80% of the run, so that the last ones still find it running.
      at: 0.05 + (0.75 * (i + 1)) / (kills.length + 1),
      run: async () => {
        if (s === 'coordinator') client.close();
        await stack.kill9(s);
        faults[`kill9_${s}`]++;
        await stack.start(s, 60_000);
        if (s === 'coordinator') client = coordinatorClient(stack.address('coordinator'));
      },
    }));
    events.push({ at: 0.2, run: async () => { api.down = true; faults.api_outage++; await sleep(opts.outageMs); api.down = false; } });
    events.push({ at: 0.5, run: async () => { api.rateLimited = true; faults.api_rate_limited++; await sleep(opts.rateLimitMs); api.rateLimited = false; } });
    if (tmpfs) {
      events.push({
        at: 0.35,
        run: async () => {
          // Fill the aggregation's disk to the last byte, hold, then free it.
          const ballast = path.join(aggregationState, 'ballast');
          const fd = fs.openSync(ballast, 'w');
          const chunk = Buffer.alloc(1 << 20);
          try {
            for (;;) fs.writeSync(fd, chunk);
          } catch {
            // ENOSPC: full
          }
          fs.closeSync(fd);
          faults.disk_full++;
          let restarted: Promise<void> = Promise.resolve();
          if (opts.killDuringDiskFull) {
            await stack.kill9('aggregation');
            faults.kill9_aggregation_disk_full = (faults.kill9_aggregation_disk_full ?? 0) + 1;
            restarted = restartUntilServing(stack, 'aggregation', opts.log);
          }
          await sleep(opts.diskFullMs);
          fs.rmSync(ballast);
          await restarted;
        },
      });
    }
    events.sort((a, b) => a.at - b.at);
    for (const ev of events) {
      for (;;) {
        const p = await progress();
        if (p && p.state !== RunState.RUN_STATE_RUNNING && p.state !== RunState.RUN_STATE_PENDING) break;
        if (p && p.aggregated >= ev.at * total) break;
        await sleep(100);
      }
      const p = await progress();
      if (p && p.state !== RunState.RUN_STATE_RUNNING && p.state !== RunState.RUN_STATE_PENDING) {
        opts.log(`the run ended (${RunState[p.state]}) before every fault was injected`);
        break;
      }
      await ev.run();
    }
    const final = await watchRun(client, 'soak', () => undefined);
    client.close();
    if (final.state !== RunState.RUN_STATE_SUCCEEDED) throw new Error(`the soak run ended ${RunState[final.state]}: ${final.error}`);

    // Every item exactly once, the clean scores, the clean axis.
    const a = readRunFiles(clean.outputDir);
    const b = readRunFiles(final.outputDir);
    let lost = 0;
    let doubled = 0;
    for (const [role, lines] of Object.entries(a.responses)) {
      const want = new Set(lines.map((l) => `${l.prompt_index}/${l.question_index}`));
      const got = (b.responses[role] ?? []).map((l) => `${l.prompt_index}/${l.question_index}`);
      doubled += got.length - new Set(got).size;
      lost += [...want].filter((k) => !got.includes(k)).length;
    }
    let scoresDiffer = 0;
    for (const [role, scores] of Object.entries(a.scores)) for (const [k, v] of Object.entries(scores)) if (b.scores[role]?.[k] !== v) scoresDiffer++;
    const axisA = (await readAxis(clean.outputDir)).tensors.axis.data;
    const axisB = (await readAxis(final.outputDir)).tensors.axis.data;
    let axisUlp = 0;
    for (let i = 0; i < axisA.length; i++) axisUlp = Math.max(axisUlp, ulpDistance(axisA[i], axisB[i]));
    return { items: total, lost, doubled, scoresDiffer, axisUlp, faults, skipped, seconds: (performance.now() - started) / 1000 };
  } finally {
    await stack.stopAll();
    await api.stop();
    if (tmpfs) execFileSync('umount', ['-l', aggregationState], { stdio: 'pipe' });
    if (!process.env.AXIS_SOAK_KEEP) fs.rmSync(dir, { recursive: true, force: true });
    else opts.log(`kept ${dir}`);
  }
}

/** Starts a service again and again (as Kubernetes restarts a crashing container) until it serves. */
async function restartUntilServing(stack: Awaited<ReturnType<typeof testStack>>['stack'], name: ServiceName, log: (s: string) => void): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    try {
      await stack.start(name, 10_000);
      return;
    } catch (err) {
      log(`${name} restart ${attempt} failed: ${(err as Error).message.split('\n')[0]}`);
      await stack.kill9(name);
      await sleep(1000);
    }
  }
}

export function printReport(r: SoakReport, out: (s: string) => void): void {
  out(`soak: ${r.items} items in ${r.seconds.toFixed(0)} s`);
  out(`faults injected and survived: ${Object.entries(r.faults).map(([k, v]) => `${k} ${v}`).join(', ')}`);
  for (const s of r.skipped) out(`skipped: ${s}`);
  out(`scores differing from the clean run: ${r.scoresDiffer}; axis: within ${r.axisUlp} float32 ulp of the clean run's`);
  out(`result: items_lost = ${r.lost}`);
  out(`result: items_doubled = ${r.doubled}`);
}

if (require.main === module) {
  const log = (s: string) => process.stdout.write(s + '\n');
  soak({ questionCount: Number(process.env.AXIS_SOAK_QUESTIONS ?? 20), killsPerService: Number(process.env.AXIS_SOAK_KILLS ?? 10), outageMs: Number(process.env.AXIS_SOAK_OUTAGE_MS ?? 60_000), rateLimitMs: Number(process.env.AXIS_SOAK_429_MS ?? 20_000), diskFullMs: 15_000, killDuringDiskFull: process.env.AXIS_SOAK_KILL_DISK_FULL !== '0', log })
    .then((r) => {
      printReport(r, log);
      process.exit(r.lost || r.doubled || r.scoresDiffer || r.axisUlp > 1 ? 1 : 0);
    })
    .catch((err) => {
      process.stderr.write(`soak: ${(err as Error).stack ?? err}\n`);
      process.exit(1);
    });
}
