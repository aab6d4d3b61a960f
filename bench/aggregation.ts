/**
 * `make bench-aggregation`: ingestion of [46, 4608] bf16 observations (Gemma 2 27B's shape)
 * into the aggregation's running sums, in items/s, against the in-process limit: the fastest
 * plain typed-array loop that widens bf16 and adds it into float64 sums over the same data in
 * the same process. Then the peak anonymous RSS of the state of a simulated full Gemma 2 27B
 * run (275 roles + default, scores spread evenly over 0-3). Ends with `result:` lines.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { spawn } from 'node:child_process';
import { AggregationServiceClient, IngestResponse, IngestRequest } from '../gen/assistant_axis/v1/aggregation';
import { Dtype } from '../gen/assistant_axis/v1/common';
import { StreamPipe } from '../services/shared/pipe';
import { channelOptions } from '../services/shared/server';
import { testStack } from '../test/kit/stack';
import { RAW_SERVICE } from './rawStreamServer';
import { RunAccumulator } from '../services/aggregation/accumulator';
import { encodeTensor, decodeTensor } from '../services/shared/tensor';

const L = 46;
const D = 4608;
const N = L * D;
const ITEMS = Number(process.env.BENCH_AGG_ITEMS ?? 600);

function observations(count: number): Uint8Array[] {
  const pool = new Float32Array(N);
  for (let i = 0; i < N; i++) pool[i] = (Math.random() - 0.5) * 4;
  const base = encodeTensor({ shape: [L, D], data: pool }, Dtype.DTYPE_BF16).data;
  // Distinct payloads (a shifted copy each) so no cache helps either side.
  return Array.from({ length: count }, (_, k) => {
    const out = new Uint8Array(base.length);
    const shift = (k * 64) % base.length;
    out.set(base.subarray(shift));
    out.set(base.subarray(0, shift), base.length - shift);
    return out;
  });
}

/** The in-process limit: widen bf16 to float32 and add into float64 sums, one plain loop per item. */
function addLoop(data: Uint8Array[]): number {
  const sum = new Float64Array(N);
  const bits = new Uint32Array(N);
  const f32 = new Float32Array(bits.buffer);
  const started = performance.now();
  for (const bytes of data) {
    const half = new Uint16Array(bytes.buffer, bytes.byteOffset, N);
    for (let i = 0; i < N; i++) bits[i] = half[i] << 16;
    for (let i = 0; i < N; i++) sum[i] += f32[i];
  }
  const seconds = (performance.now() - started) / 1000;
  if (!Number.isFinite(sum[0])) throw new Error('unreachable');
  return data.length / seconds;
}

/** The aggregation's own path: decode the wire tensor, join with its score, fold into the (role, score) sum. */
function ingest(data: Uint8Array[]): number {
  const acc = new RunAccumulator();
  const scratch = new Float32Array(N);
  const started = performance.now();
  data.forEach((bytes, k) => {
    const t = decodeTensor({ dtype: Dtype.DTYPE_BF16, shape: [L, D], data: Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength) }, 'activation', undefined, scratch);
    acc.addScore('pirate', `k${k}`, 3);
    acc.addActivation('pirate', `k${k}`, t.shape, t.data, undefined, t.firstNonFinite);
  });
  const seconds = (performance.now() - started) / 1000;
  if (acc.folded !== data.length) throw new Error('not every item was folded');
  return data.length / seconds;
}

function rssAnonMiB(): number {
  const m = /RssAnon:\s+(\d+) kB/.exec(fs.readFileSync('/proc/self/status', 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

/**
 * A full Gemma 2 27B run's state as the aggregation service keeps it: every (role, score)
 * bucket of 275 roles and default, score-3 and default sums in RAM, the others in files.
 */
function fullRunState(coldDir: string): number {
  const before = rssAnonMiB();
  const acc = new RunAccumulator(coldDir);
  const one = new Float32Array(N).fill(0.5);
  for (let r = 0; r < 275; r++) {
    for (let score = 0; score <= 3; score++) {
      acc.addScore(`role${r}`, `k${score}`, score);
      acc.addActivation(`role${r}`, `k${score}`, [L, D], one);
    }
  }
  acc.addActivation('default', 'k', [L, D], one);
  const after = rssAnonMiB();
  if (acc.folded !== 275 * 4 + 1) throw new Error('unexpected fold count');
  return after - before + 0;
}

/** Items/s through a gRPC bidi stream with at most `window` messages unacknowledged. */
async function throughStream(send: (i: number) => Promise<unknown>, count: number, window = 32): Promise<number> {
  const started = performance.now();
  let next = 0;
  const worker = async () => {
    while (next < count) await send(next++);
  };
  await Promise.all(Array.from({ length: window }, worker));
  return count / ((performance.now() - started) / 1000);
}

/**
 * The aggregation service as a process, over gRPC, each observation acknowledged only once it
 * is in the journal on disk; against the same bytes sent to a server that only acknowledges them.
 */
async function grpcPaths(data: Uint8Array[]): Promise<{ durable: number; raw: number }> {
  const { stack, dir } = await testStack('bench-agg');
  const raw = spawn(process.execPath, [path.join(__dirname, 'rawStreamServer.js')], { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    await stack.start('aggregation');
    const client = new AggregationServiceClient(stack.address('aggregation'), grpc.credentials.createInsecure(), channelOptions());
    const pipe = new StreamPipe<IngestRequest, IngestResponse>(() => client.ingest(), (a) => `${a.role}/${a.itemKey}/${a.isActivation}`);
    // Scores first, so every activation folds at once.
    await throughStream((i) => pipe.send(`pirate/k${i}/false`, { run: 'bench', role: 'pirate', itemKey: `k${i}`, payload: { $case: 'score', value: { score: 3 } }, runShape: [], runPlan: undefined }), data.length);
    const durable = await throughStream(
      (i) => pipe.send(`pirate/k${i}/true`, { run: 'bench', role: 'pirate', itemKey: `k${i}`, payload: { $case: 'activation', value: { dtype: Dtype.DTYPE_BF16, shape: [L, D], data: Buffer.from(data[i]) } }, runShape: [L, D], runPlan: undefined }),
      data.length,
    );
    pipe.close();
    client.close();

    const port = await new Promise<number>((resolve) => raw.stdout!.once('data', (b: Buffer) => resolve(Number(b.toString().trim()))));
    const RawClient = grpc.makeGenericClientConstructor(RAW_SERVICE, 'Raw');
    const rawClient = new RawClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), channelOptions()) as unknown as { echo: () => grpc.ClientDuplexStream<Buffer, Buffer> };
    const call = rawClient.echo();
    let finished = false;
    call.on('error', (err) => finished || process.stderr.write(`raw stream: ${err.message}\n`));
    const waiting: (() => void)[] = [];
    call.on('data', () => waiting.shift()?.());
    const rawRate = await throughStream(
      (i) =>
        new Promise<void>((resolve) => {
          waiting.push(resolve);
          call.write(Buffer.from(data[i]));
        }),
      data.length,
    );
    finished = true;
    call.end();
    return { durable, raw: rawRate };
  } finally {
    raw.kill();
    await stack.stopAll();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const data = observations(ITEMS);
  // Warm both paths up, then measure each twice and keep the best.
  addLoop(data.slice(0, 50));
  ingest(data.slice(0, 50));
  const limit = Math.max(addLoop(data), addLoop(data));
  const ours = Math.max(ingest(data), ingest(data));
  const baseRss = rssAnonMiB();
  const coldDir = fs.mkdtempSync(path.join(os.tmpdir(), 'axis-bench-cold-'));
  let stateRss: number;
  try {
    stateRss = fullRunState(coldDir);
  } finally {
    fs.rmSync(coldDir, { recursive: true, force: true });
  }
  process.stdout.write(`[${L}, ${D}] bf16, ${ITEMS} items: aggregation ${ours.toFixed(0)} items/s, plain widen+add loop ${limit.toFixed(0)} items/s\n`);
  process.stdout.write(`full Gemma 2 27B run state (1101 buckets of ${L} x ${D} float64; 276 in RAM, 825 in files): RssAnon +${stateRss.toFixed(0)} MiB over ${baseRss.toFixed(0)} MiB\n`);
  process.stdout.write(`result: aggregation_items_per_s = ${ours.toFixed(0)} items/s\n`);
  process.stdout.write(`result: add_loop_items_per_s = ${limit.toFixed(0)} items/s\n`);
  process.stdout.write(`result: aggregation_vs_add_loop = ${(ours / limit).toFixed(2)} x\n`);
  process.stdout.write(`result: fullrun_state_rss = ${stateRss.toFixed(0)} MiB\n`);
  const g = await grpcPaths(data);
  process.stdout.write(`gRPC, durable acknowledgements: ${g.durable.toFixed(0)} items/s; raw bytes stream of the same size: ${g.raw.toFixed(0)} items/s\n`);
  process.stdout.write(`result: grpc_durable_items_per_s = ${g.durable.toFixed(0)} items/s\n`);
  process.stdout.write(`result: grpc_raw_stream_items_per_s = ${g.raw.toFixed(0)} items/s\n`);
  process.stdout.write(`result: grpc_durable_vs_raw_stream = ${(g.durable / g.raw).toFixed(2)} x\n`);
}

main().catch((err) => {
  process.stderr.write(`${(err as Error).stack}\n`);
  process.exit(1);
});
