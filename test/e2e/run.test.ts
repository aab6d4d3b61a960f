import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Tiktoken } from 'js-tiktoken/lite';
import o200kBase from 'js-tiktoken/ranks/o200k_base';
import { promisify } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { AggregationServiceClient } from '../../gen/assistant_axis/v1/aggregation';
import { RunState } from '../../gen/assistant_axis/v1/coordinator';
import { judgePrompt } from '../../services/contracts/judge';
import type { LocalStack } from '../../services/cli/stack';
import { expectedReply, expectedScore, FakeOpenAIServer } from '../doubles/openai-server';
import { coordinatorClient, getRun, startRun, waitFor, watchRun } from '../helpers/grpc';
import { syntheticActivation } from '../../services/inference/synthetic';
import { CappingConfig } from '../../services/inference/onnx';
import { decodeSafetensors, readSafetensors } from '../../services/shared/safetensors';
import { readAxis, readRunFiles, recomputeAxis, relativeErrorPerLayer } from '../kit/runfiles';
import { ROOT, testStack, UPSTREAM_DATA } from '../kit/stack';
import { priceFile } from '../kit/files';

const run = promisify(execFile);
const L = 6;
const D = 40;
const QUESTIONS = 8;
const MIN_COUNT = 8;

/** buf curl speaks the same reflection protocol as grpcurl: no proto files are given to it. */
async function bufCurl(args: string[]): Promise<string> {
  const { stdout } = await run(path.join(ROOT, 'node_modules', '.bin', 'buf'), ['curl', '--protocol', 'grpc', '--http2-prior-knowledge', ...args], { cwd: '/tmp', timeout: 60_000 });
  return stdout;
}

describe('end to end: four processes, synthetic backend, OpenAI-compatible judge server', () => {
  let stack: LocalStack;
  const judge = new FakeOpenAIServer();

  beforeAll(async () => {
    await judge.start();
    const prices = priceFile({ 'judge-test': { prompt: 1, completion: 4 } });
    ({ stack } = await testStack('e2e', {
      args: {
        inference: ['--synthetic-layers', String(L), '--synthetic-hidden', String(D), '--capacity', '8'],
        judge: ['--provider', 'openai', '--base-url', judge.baseUrl, '--model', 'judge-test', '--prices', prices, '--backoff-ms', '5'],
      },
      env: { OPENAI_API_KEY: 'sk-test-secret-key-123' },
    }));
    await stack.startAll();
  });

  afterAll(async () => {
    await stack?.stopAll();
    await judge.stop();
  });

  /**
   * The run `e2e`, complete: started (or found complete) by whichever test needs it, so that no
   * test depends on another having run first (StartRun with the same request is idempotent).
   */
  const E2E = { name: 'e2e', questionCount: QUESTIONS, minCount: MIN_COUNT, seed: 11, maxNewTokens: 48 };
  async function completeE2e(): Promise<void> {
    const client = coordinatorClient(stack.address('coordinator'));
    await startRun(client, E2E);
    expect((await watchRun(client, 'e2e', () => undefined)).state).toBe(RunState.RUN_STATE_SUCCEEDED);
    client.close();
  }

  it('lists every service through server reflection, with no proto files', async () => {
    for (const name of ['coordinator', 'inference', 'judge', 'aggregation'] as const) {
      const out = await bufCurl(['--list-services', `http://${stack.address(name)}`]);
      // Each service describes itself and the health service, nothing else.
      expect(out.trim().split('\n').sort()).toEqual([`assistant_axis.v1.${name[0].toUpperCase()}${name.slice(1)}Service`, 'grpc.health.v1.Health']);
      const health = JSON.parse(await bufCurl(['-d', '{"service":""}', `http://${stack.address(name)}/grpc.health.v1.Health/Check`]));
      expect(health.status).toBe('SERVING');
    }
    const methods = await bufCurl(['--list-methods', `http://${stack.address('coordinator')}`]);
    for (const m of ['StartRun', 'GetRun', 'ListRuns', 'WatchRun', 'CancelRun', 'DeleteRun']) expect(methods).toContain(`assistant_axis.v1.CoordinatorService/${m}`);
  });

  it('runs through the coordinator started and watched with buf curl; files and axis match an independent recomputation', async () => {
    const address = `http://${stack.address('coordinator')}`;
    const started = JSON.parse(await bufCurl(['-d', JSON.stringify(E2E), `${address}/assistant_axis.v1.CoordinatorService/StartRun`]));
    expect(started.name).toBe('e2e');
    expect(started.backend).toBe('synthetic');
    expect(started.judge).toContain('judge-test');
    // Times are google.protobuf.Timestamps: RFC 3339 in JSON; the end is set only once the run has ended.
    const t0 = Date.now();
    expect(started.createTime).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/);
    expect(Math.abs(Date.parse(started.createTime) - t0)).toBeLessThan(60_000);
    expect(started.endTime).toBeUndefined();
    const watched = await bufCurl(['-d', '{"name":"e2e"}', `${address}/assistant_axis.v1.CoordinatorService/WatchRun`]);
    // buf curl prints each streamed message as a JSON object; the last is the finished run.
    const messages = watched.trim().split(/\n(?=\{)/).map((m) => JSON.parse(m));
    const final = messages[messages.length - 1];
    expect(final.state).toBe('RUN_STATE_SUCCEEDED');
    expect(final.createTime).toBe(started.createTime);
    expect(Date.parse(final.endTime)).toBeGreaterThanOrEqual(Date.parse(started.createTime));
    expect(Date.parse(final.endTime)).toBeLessThanOrEqual(Date.now());
    expect(final.progress.aggregated).toBe(String(9 * 5 * QUESTIONS));

    const runDir = final.outputDir as string;
    const files = readRunFiles(runDir);
    // Reference formats: 9 roles, 5 x Q lines each in (prompt, question) order, exactly the reference's fields.
    expect(Object.keys(files.responses).sort()).toEqual(['astronaut', 'chef', 'default', 'detective', 'gardener', 'lighthouse_keeper', 'medieval_knight', 'poet', 'stoic_philosopher']);
    expect(Object.keys(files.scores)).not.toContain('default');
    const roleFile = JSON.parse(fs.readFileSync(path.join(ROOT, 'data', 'roles', 'instructions', 'chef.json'), 'utf8'));
    for (const [role, lines] of Object.entries(files.responses)) {
      expect(lines).toHaveLength(5 * QUESTIONS);
      lines.forEach((line, i) => {
        expect(Object.keys(line).sort()).toEqual(['conversation', 'label', 'prompt_index', 'question', 'question_index', 'system_prompt']);
        expect([line.prompt_index, line.question_index]).toEqual([Math.floor(i / QUESTIONS), i % QUESTIONS]);
        expect(line.label).toBe('pos');
        expect(line.conversation[line.conversation.length - 1].role).toBe('assistant');
        expect(line.conversation[line.conversation.length - 2]).toEqual({ role: 'user', content: line.question });
      });
      if (role === 'chef') {
        // The judge saw the role's eval prompt filled with this question and answer; the scores file holds what it answered.
        for (const line of lines) {
          const prompt = judgePrompt(roleFile.eval_prompt, line.question, line.conversation[line.conversation.length - 1].content);
          const expected = expectedScore(prompt);
          const key = `pos_p${line.prompt_index}_q${line.question_index}`;
          expect([key, files.scores.chef[key]]).toEqual([key, expected]);
          if (expected === undefined) expect(expectedReply(prompt)).not.toMatch(/\d/);
        }
      }
    }
    // Every judged item reached the judge with the API key as a bearer token, at most 10 tokens, temperature 1.
    expect(judge.requests.length).toBeGreaterThanOrEqual(8 * 5 * QUESTIONS);
    expect(judge.requests.every((r) => r.authorization === 'Bearer sk-test-secret-key-123' && r.body.max_tokens === 10 && r.body.temperature === 1 && r.body.model === 'judge-test')).toBe(true);

    const { tensors, metadata } = await readAxis(runDir);
    expect(tensors.axis.shape).toEqual([L, D]);
    expect(metadata.model).toBe('synthetic-tiny');
    const ref = recomputeAxis(files, L, D, MIN_COUNT);
    expect(ref.kept.length).toBeGreaterThan(0);
    const errors = relativeErrorPerLayer(tensors.axis.data, ref.axis, L, D);
    for (const e of errors) expect(e).toBeLessThanOrEqual(1e-6);
    expect(final.summary.kept.map((k: { role: string }) => k.role).sort()).toEqual(ref.kept.sort());
    for (const role of ref.kept) expect(fs.existsSync(path.join(runDir, 'vectors', `${role}.safetensors`))).toBe(true);
    expect(fs.existsSync(path.join(runDir, 'vectors', 'default.safetensors'))).toBe(true);
    // Beside the axis, the two means it is the difference of, from the vector files, and each row's layer.
    const vector = async (role: string) => (await readSafetensors(path.join(runDir, 'vectors', `${role}.safetensors`))).tensors.vector.data;
    const roleVectors = await Promise.all(ref.kept.map(vector));
    const roleMean = Array.from({ length: L * D }, (_, i) => roleVectors.reduce((s, v) => s + v[i], 0) / roleVectors.length);
    const defaultVector = await vector('default');
    for (let i = 0; i < L * D; i++) {
      expect(Math.abs(tensors.role_mean.data[i] - roleMean[i])).toBeLessThanOrEqual(1e-5 * Math.max(1, Math.abs(roleMean[i])));
      expect(Math.abs(tensors.default_mean.data[i] - defaultVector[i])).toBeLessThanOrEqual(1e-5 * Math.max(1, Math.abs(defaultVector[i])));
      expect(Math.abs(tensors.axis.data[i] - (defaultVector[i] - roleMean[i]))).toBeLessThanOrEqual(1e-5 * Math.max(1, Math.abs(defaultVector[i])));
    }
    expect(Array.from(tensors.layer_index.data)).toEqual([...Array(L).keys()]);

    const manifest = JSON.parse(fs.readFileSync(path.join(runDir, 'manifest.json'), 'utf8'));
    expect(manifest.model.backend).toBe('synthetic');
    expect(manifest.judge).toMatchObject({ provider: 'openai', model: 'judge-test', meaningful: true });
    expect(manifest.sampling).toEqual({ temperature: 0.7, top_p: 0.9, max_new_tokens: 48, max_context: 2048, enable_thinking: false });
    expect(manifest.seed).toBe(11);
    expect(manifest.data.sha256).toMatch(/^[0-9a-f]{64}$/);

    // The key never reaches the logs.
    for (const f of fs.readdirSync(stack.opts.logDir)) expect(fs.readFileSync(path.join(stack.opts.logDir, f), 'utf8')).not.toContain('sk-test-secret-key-123');
  });

  it('writes report.json and report.html, and compares with another axis when given one', async () => {
    await completeE2e();
    const client = coordinatorClient(stack.address('coordinator'));
    const e2eDir = path.join(stack.opts.outputRoot, 'e2e');
    const report = JSON.parse(fs.readFileSync(path.join(e2eDir, 'report.json'), 'utf8'));
    expect(report.num_layers).toBe(L);
    expect(report.axis_vs_pc1).toHaveLength(L);
    expect(report.projections.length).toBe(report.roles_kept.length + 1);
    expect(fs.readFileSync(path.join(e2eDir, 'report.html'), 'utf8')).toContain('<svg');
    // The same run under another name has the same axis: cosine 1 at every layer.
    await startRun(client, { name: 'compared', questionCount: QUESTIONS, minCount: MIN_COUNT, seed: 11, maxNewTokens: 48, compareAxis: path.join(e2eDir, 'axis.safetensors') });
    const done = await watchRun(client, 'compared', () => undefined);
    const compared = JSON.parse(fs.readFileSync(path.join(done.outputDir, 'report.json'), 'utf8'));
    expect(compared.compare.name).toBe('axis.safetensors');
    for (const c of compared.compare.cosine_per_layer) expect(c).toBeCloseTo(1, 6);
    // A run of some layers compares with the whole model's axis at those layers.
    await startRun(client, { name: 'compared-layers', questionCount: QUESTIONS, minCount: MIN_COUNT, seed: 11, maxNewTokens: 48, layers: [1, 4], compareAxis: path.join(e2eDir, 'axis.safetensors') });
    const some = await watchRun(client, 'compared-layers', () => undefined);
    expect(some.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    const partial = JSON.parse(fs.readFileSync(path.join(some.outputDir, 'report.json'), 'utf8'));
    expect(partial.compare.cosine_per_layer).toHaveLength(2);
    for (const c of partial.compare.cosine_per_layer) expect(c).toBeCloseTo(1, 6);
    client.close();
  });

  it('archives every activation in bf16 per role when asked (off by default)', async () => {
    await completeE2e();
    const client = coordinatorClient(stack.address('coordinator'));
    await startRun(client, { name: 'archived', roles: ['chef', 'default'], questionCount: 2, minCount: 1, archiveActivations: true });
    const done = await watchRun(client, 'archived', () => undefined);
    expect(done.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    expect(await getRun(client, 'archived')).toMatchObject({ archiveActivations: true, roles: ['chef', 'default'], layers: [], twoPass: false, dataDir: path.join(ROOT, 'data') });
    const files = readRunFiles(done.outputDir);
    for (const role of ['chef', 'default']) {
      const buf = fs.readFileSync(path.join(done.outputDir, 'activations', `${role}.safetensors`));
      const n = Number(buf.readBigUInt64LE(0));
      const header = JSON.parse(buf.subarray(8, 8 + n).toString());
      expect(Object.keys(header).filter((k) => k !== '__metadata__')).toEqual(files.responses[role].map((l) => `pos_p${l.prompt_index}_q${l.question_index}`));
      const { tensors } = decodeSafetensors(buf);
      for (const line of files.responses[role]) {
        const t = tensors[`pos_p${line.prompt_index}_q${line.question_index}`];
        expect(header[`pos_p${line.prompt_index}_q${line.question_index}`].dtype).toBe('BF16');
        expect(t.shape).toEqual([L, D]);
        const exact = syntheticActivation(line.conversation, L, D).data;
        for (let i = 0; i < exact.length; i++) expect(Math.abs(t.data[i] - exact[i])).toBeLessThanOrEqual(Math.abs(exact[i]) / 128 + 1e-30);
      }
    }
    expect(fs.existsSync(path.join(done.outputDir, 'activations', '.staging'))).toBe(false);
    expect(fs.existsSync(path.join(stack.opts.outputRoot, 'e2e', 'activations'))).toBe(false);
    client.close();
  });

  it('reports where its answers lie on its axis: percentiles per group and layer, as recomputed from the archived activations', async () => {
    const client = coordinatorClient(stack.address('coordinator'));
    await startRun(client, { name: 'placed', roles: ['chef', 'poet', 'default'], questionCount: 2, minCount: 1, archiveActivations: true });
    const done = await watchRun(client, 'placed', () => undefined);
    expect(done.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    const files = readRunFiles(done.outputDir);
    const axis = (await readAxis(done.outputDir)).tensors.axis.data;
    // Every answer's projection per layer, from the archive, in float64. The archive is bf16 and
    // aggregation kept what it was sent (float32 here): each projection can differ by up to
    // sum |a_i u_i| / 256 (bf16 keeps 8 significant bits), and so can a percentile of them.
    const groups: Record<string, number[][]> = { role_play: [], role_play_3: [], default: [] };
    const slack = new Array<number>(L).fill(0);
    for (const role of ['chef', 'poet', 'default']) {
      const { tensors } = decodeSafetensors(fs.readFileSync(path.join(done.outputDir, 'activations', `${role}.safetensors`)));
      for (const [key, t] of Object.entries(tensors)) {
        const p = Array.from({ length: L }, (_, l) => {
          let dot = 0;
          let sq = 0;
          let bound = 0;
          for (let i = 0; i < D; i++) {
            dot += t.data[l * D + i] * axis[l * D + i];
            bound += Math.abs(t.data[l * D + i] * axis[l * D + i]);
            sq += axis[l * D + i] ** 2;
          }
          slack[l] = Math.max(slack[l], bound / Math.sqrt(sq) / 256);
          return dot / Math.sqrt(sq);
        });
        if (role === 'default') groups.default.push(p);
        else {
          groups.role_play.push(p);
          if (files.scores[role][key] === 3) groups.role_play_3.push(p);
        }
      }
    }
    // Hazen's percentile (numpy method="hazen"), weighted for the pooled group: written out here.
    const percentile = (values: { v: number; w: number }[], q: number) => {
      const sorted = [...values].sort((a, b) => a.v - b.v);
      const total = sorted.reduce((s, x) => s + x.w, 0);
      const mids: number[] = [];
      let run = 0;
      for (const x of sorted) {
        mids.push((run + x.w / 2) / total);
        run += x.w;
      }
      const at = q / 100;
      if (at <= mids[0]) return sorted[0].v;
      if (at >= mids[mids.length - 1]) return sorted[sorted.length - 1].v;
      const k = mids.findIndex((m) => m >= at);
      return sorted[k - 1].v + ((sorted[k].v - sorted[k - 1].v) * (at - mids[k - 1])) / (mids[k] - mids[k - 1]);
    };
    const report = JSON.parse(fs.readFileSync(path.join(done.outputDir, 'report.json'), 'utf8'));
    const levels = [1, 5, 25, 50, 75, 95, 99];
    const want: Record<string, { v: number; w: number }[][]> = {
      role_play: Array.from({ length: L }, (_, l) => groups.role_play.map((p) => ({ v: p[l], w: 1 }))),
      role_play_3: Array.from({ length: L }, (_, l) => groups.role_play_3.map((p) => ({ v: p[l], w: 1 }))),
      default: Array.from({ length: L }, (_, l) => groups.default.map((p) => ({ v: p[l], w: 1 }))),
      // The whole run is sampled (fewer than 4,096 answers a group): every answer weighs the same.
      pooled: Array.from({ length: L }, (_, l) => [...groups.role_play, ...groups.default].map((p) => ({ v: p[l], w: 1 }))),
    };
    expect(report.answer_projections.map((a: { group: string }) => a.group)).toEqual(['role_play', 'role_play_3', 'default', 'pooled']);
    for (const a of report.answer_projections) {
      const n = a.group === 'pooled' ? groups.role_play.length + groups.default.length : groups[a.group].length;
      expect(a).toMatchObject({ sample_size: n, total: n, levels });
      for (let l = 0; l < L; l++) levels.forEach((q, k) => expect(Math.abs(a.by_layer[l][k] - percentile(want[a.group][l], q))).toBeLessThanOrEqual(slack[l]));
      expect(a.at_target).toEqual(a.by_layer[report.target_layer]);
    }
    expect(groups.role_play_3.length).toBeGreaterThan(0);
    expect(groups.role_play_3.length).toBeLessThan(groups.role_play.length);
    // axis.safetensors carries them at the target layer (what a replica monitoring with it reads).
    const carried = JSON.parse((await readAxis(done.outputDir)).metadata.answer_percentiles);
    expect(carried.layer).toBe(report.target_layer);
    for (const a of report.answer_projections) expect(carried.groups[a.group]).toEqual(a.at_target);
    // Calibration: -axis[l] per layer, caps at minus the pooled percentiles (recomputed here) of the band's layers.
    const prefix = path.join(done.outputDir, '..', 'placed-capping');
    const cal = await promisify(execFile)(process.execPath, [path.join(ROOT, 'dist/services/cli/axis.js'), 'calibrate', 'placed', '--out', prefix, '--percentiles', '25,50', '--layer-ranges', '3:5', '--coordinator', stack.address('coordinator')]);
    expect(cal.stdout).toContain('2 vectors, 2 experiments (layers_3:5-p0.25, layers_3:5-p0.5)');
    const config = JSON.parse(fs.readFileSync(`${prefix}.json`, 'utf8'));
    const vectors = (await readSafetensors(`${prefix}.safetensors`)).tensors;
    for (const l of [3, 4]) {
      expect(config.vectors[`neg_axis_l${l}`]).toEqual({ layer: l });
      expect(Array.from(vectors[`neg_axis_l${l}`].data)).toEqual(Array.from(axis.subarray(l * D, (l + 1) * D), (x) => -x));
    }
    for (const [q, id] of [[25, 'layers_3:5-p0.25'], [50, 'layers_3:5-p0.5']] as const) {
      const e = config.experiments.find((x: { id: string }) => x.id === id);
      e.interventions.forEach((iv: { vector: string; cap: number }, k: number) => {
        expect(iv.vector).toBe(`neg_axis_l${3 + k}`);
        expect(Math.abs(iv.cap - -percentile(want.pooled[3 + k], q))).toBeLessThanOrEqual(slack[3 + k]);
      });
    }
    // The engine's loader takes it; an experiment's caps hold the projection at or above the percentile.
    expect(CappingConfig.load(prefix, { numLayers: L, hidden: D }).experiment('layers_3:5-p0.25')!.layers.get(3)!.tau).toBe(config.experiments[0].interventions[0].cap);
    // GetRun returns them too, and the report's page plots them.
    expect((await getRun(client, 'placed')).summary!.answerProjections.map((a) => a.group)).toEqual(['role_play', 'role_play_3', 'default', 'pooled']);
    expect(fs.readFileSync(path.join(done.outputDir, 'report.html'), 'utf8')).toContain('Where the answers lie on the axis');
    client.close();
  });

  it('does no work again when the same run is started twice, and says so', async () => {
    await completeE2e();
    const client = coordinatorClient(stack.address('coordinator'));
    const before = judge.requests.length;
    const again = await startRun(client, E2E);
    expect(again.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    expect(again.message).toMatch(/already complete/);
    expect(judge.requests.length).toBe(before);
    expect((await getRun(client, 'e2e')).summary?.kept.length).toBeGreaterThan(0);
    client.close();
  });

  it('deletes a run that is not running: its ledger rows, outputs and aggregation state; refuses while it runs', async () => {
    const client = coordinatorClient(stack.address('coordinator'));
    const deleteRun = (name: string) => new Promise<void>((resolve, reject) => client.deleteRun({ name }, (err) => (err ? reject(err) : resolve())));
    const aggregation = new AggregationServiceClient(stack.address('aggregation'), grpc.credentials.createInsecure());
    const activationsThere = (run: string) => new Promise<number>((resolve, reject) => aggregation.getRunState({ run }, (err, r) => (err ? reject(err) : resolve(Number(r.activations)))));
    await startRun(client, { name: 'doomed', questionCount: 8, minCount: 1 });
    await expect(deleteRun('doomed')).rejects.toMatchObject({ code: grpc.status.FAILED_PRECONDITION, details: expect.stringMatching(/is running: cancel it first/) });
    await waitFor('an aggregated item', async () => ((await getRun(client, 'doomed')).progress!.aggregated > 0 ? true : undefined));
    await new Promise<void>((resolve, reject) => client.cancelRun({ name: 'doomed' }, (err) => (err ? reject(err) : resolve())));
    const stopped = await watchRun(client, 'doomed', () => undefined);
    expect(stopped.state).toBe(RunState.RUN_STATE_CANCELLED);
    expect(await activationsThere('doomed')).toBeGreaterThan(0);
    expect(fs.existsSync(stopped.outputDir)).toBe(true);
    await deleteRun('doomed');
    await expect(getRun(client, 'doomed')).rejects.toMatchObject({ code: grpc.status.NOT_FOUND });
    const runs = await new Promise<string[]>((resolve, reject) => client.listRuns({}, (e, r) => (e ? reject(e) : resolve(r.runs.map((x) => x.name)))));
    expect(runs).not.toContain('doomed');
    expect(fs.existsSync(stopped.outputDir)).toBe(false);
    expect(await activationsThere('doomed')).toBe(0);
    await expect(deleteRun('doomed')).rejects.toMatchObject({ code: grpc.status.NOT_FOUND });
    // The name is free again: a new run of it starts from nothing and completes.
    await startRun(client, { name: 'doomed', roles: ['chef', 'default'], questionCount: 2, minCount: 1 });
    const again = await watchRun(client, 'doomed', () => undefined);
    expect(again.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    expect(again.progress!.aggregated).toBe(2 * 5 * 2);
    aggregation.close();
    client.close();
  });

  it('fails with FAILED_PRECONDITION listing the counts when no role reaches min_count', async () => {
    const client = coordinatorClient(stack.address('coordinator'));
    await startRun(client, { name: 'too-strict', roles: ['chef', 'default'], questionCount: 2, minCount: 50 });
    const final = await watchRun(client, 'too-strict', () => undefined);
    expect(final.state).toBe(RunState.RUN_STATE_FAILED);
    expect(final.error).toMatch(/min_count=50.*chef=\d+/);
    expect(fs.existsSync(path.join(final.outputDir, 'axis.safetensors'))).toBe(false);
    client.close();
  });

  it('scores every item although the judge API answers 429 and 500 at times (the client retries)', async () => {
    const client = coordinatorClient(stack.address('coordinator'));
    const before = judge.requests.length;
    judge.failNext(2, 429);
    judge.failNext(2, 500);
    await startRun(client, { name: 'flaky-judge', roles: ['poet', 'default'], questionCount: 3, minCount: 1 });
    const final = await watchRun(client, 'flaky-judge', () => undefined);
    expect(final.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    expect(final.progress?.judged).toBe(15);
    // Which items get a reply without a score, from the judge double's own rule over the prompts the run made.
    const poet = JSON.parse(fs.readFileSync(path.join(ROOT, 'data', 'roles', 'instructions', 'poet.json'), 'utf8'));
    const unscored = readRunFiles(final.outputDir).responses.poet.filter((l) => expectedScore(judgePrompt(poet.eval_prompt, l.question, l.conversation[l.conversation.length - 1].content)) === undefined).length;
    expect(final.progress!.judgeUnscored).toBe(unscored);
    // 15 judged items + the 4 failed attempts + 2 more asks of each item whose reply held no score.
    expect(judge.requests.length - before).toBe(15 + 4 + 2 * unscored);
    client.close();
  });

  it('runs on the reference data set read from ../shared/upstream', async () => {
    const client = coordinatorClient(stack.address('coordinator'));
    await startRun(client, { name: 'upstream', dataDir: UPSTREAM_DATA, roles: ['pirate', 'default'], questionCount: 2, minCount: 1 });
    const final = await watchRun(client, 'upstream', () => undefined);
    expect(final.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    const files = readRunFiles(final.outputDir);
    expect(files.responses.pirate).toHaveLength(10);
    expect(files.responses.default).toHaveLength(10);
    // default's "You are {model_name}." is filled with the model's short name.
    expect(files.responses.default.map((l) => l.system_prompt)).toContain('You are Synthetic.');
    const manifest = JSON.parse(fs.readFileSync(path.join(final.outputDir, 'manifest.json'), 'utf8'));
    expect(manifest.data.dir).toBe(UPSTREAM_DATA);
    client.close();
  });

  it('answers a dry run with the prompt count, a sample prompt and the estimated cost, and writes nothing', async () => {
    const client = coordinatorClient(stack.address('coordinator'));
    const before = judge.requests.length;
    const run = await startRun(client, { name: 'dry', questionCount: 4, maxNewTokens: 100, dryRun: true });
    const dry = run.dryRun!;
    expect(dry.items).toBe(9 * 5 * 4);
    expect(dry.judgePrompts).toBe(8 * 5 * 4);
    expect(dry.samplePrompt).toContain('How should someone spend a quiet Sunday morning?');
    expect(dry.samplePrompt).toContain("<the model's answer, up to 100 tokens>");
    expect(dry.estimatedCompletionTokens).toBe(160 * 10);
    // Prompt tokens by o200k_base (js-tiktoken here, each filled prompt whole): the dry run's count
    // by parts is at least that, and at most a token more at each side of each placeholder.
    const encoder = new Tiktoken(o200kBase);
    const questions = fs.readFileSync(path.join(ROOT, 'data', 'extraction_questions.jsonl'), 'utf8').trim().split('\n').slice(0, 4).map((l) => JSON.parse(l).question as string);
    let low = 0;
    let joints = 0;
    for (const f of fs.readdirSync(path.join(ROOT, 'data', 'roles', 'instructions'))) {
      const role = JSON.parse(fs.readFileSync(path.join(ROOT, 'data', 'roles', 'instructions', f), 'utf8')) as { instruction: unknown[]; eval_prompt?: string };
      if (f.startsWith('default') || !role.eval_prompt) continue;
      for (const q of questions) {
        low += role.instruction.length * (encoder.encode(role.eval_prompt.replace(/\{(question|answer)\}/g, (_m, x) => (x === 'question' ? q : ''))).length + 100);
        joints += role.instruction.length * 2 * (role.eval_prompt.match(/\{(question|answer)\}/g) ?? []).length;
      }
    }
    expect(dry.estimatedPromptTokens).toBeGreaterThanOrEqual(low);
    expect(dry.estimatedPromptTokens).toBeLessThanOrEqual(low + joints);
    expect(dry.note).toMatch(/o200k_base/);
    expect(dry.estimatedCostUsd).toBeCloseTo((dry.estimatedPromptTokens * 1 + dry.estimatedCompletionTokens * 4) / 1e6, 10);
    expect(dry.judgeModel).toBe('judge-test');
    // The Run echoes the spec it resolved: the data directory and its sha256, layers, modes.
    const echoed = await startRun(client, { name: 'dry', questionCount: 4, maxNewTokens: 100, dryRun: true, layers: [1, 3], twoPass: true, judgeBatch: true, archiveActivations: true });
    expect(echoed).toMatchObject({ dataDir: path.join(ROOT, 'data'), layers: [1, 3], twoPass: true, judgeBatch: true, archiveActivations: true, compareAxis: '', compareRun: '', cappingExperiment: '', importDir: '' });
    expect(echoed.dataSha256).toMatch(/^[0-9a-f]{64}$/);
    expect(judge.requests.length).toBe(before);
    const runs = await new Promise<string[]>((resolve, reject) => client.listRuns({}, (e, r) => (e ? reject(e) : resolve(r.runs.map((x) => x.name)))));
    expect(runs).not.toContain('dry');
    expect(fs.existsSync(path.join(stack.opts.outputRoot, 'dry'))).toBe(false);
    client.close();
  });

  it('pauses a run at its judge spending cap and resumes it when the cap is raised, judging nothing twice', async () => {
    const client = coordinatorClient(stack.address('coordinator'));
    const request = { name: 'capped', roles: ['chef', 'poet', 'default'], questionCount: 4, minCount: 1 };
    const before = judge.requests.length;
    await startRun(client, { ...request, maxJudgeCostUsd: 0.0005 });
    const paused = await watchRun(client, 'capped', () => undefined);
    expect(paused.state).toBe(RunState.RUN_STATE_PAUSED);
    expect(paused.message).toMatch(/judge spending cap reached: \$0\.000\d+ spent of \$0\.0005/);
    expect(paused.progress!.judged).toBeLessThan(40);
    // Calls in flight count against the cap by their estimated cost before their bill arrives, so the
    // run stops near the cap (only an item's re-asks can take it past), not a window of 32 calls past it.
    expect(paused.progress!.judgeCostUsd).toBeGreaterThan(0.0005 * 0.5);
    expect(paused.progress!.judgeCostUsd).toBeLessThan(0.0005 * 2);
    const resumed = await startRun(client, { ...request, maxJudgeCostUsd: 1 });
    expect(resumed.maxJudgeCostUsd).toBe(1);
    const done = await watchRun(client, 'capped', () => undefined);
    expect(done.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    expect(done.progress!.judged).toBe(40);
    // Each prompt of this run got at most one scored reply.
    const chef = JSON.parse(fs.readFileSync(path.join(ROOT, 'data', 'roles', 'instructions', 'chef.json'), 'utf8'));
    const prompts = judge.requests.slice(before).map((r) => r.body.messages[0].content as string).filter((p) => p.startsWith(chef.eval_prompt.slice(0, 60)) && /quiet Sunday|best way to learn|decide whom to trust|friendship last/.test(p));
    const counts = new Map<string, number>();
    for (const p of prompts) if (expectedScore(p) !== undefined) counts.set(p, (counts.get(p) ?? 0) + 1);
    expect(Math.max(...counts.values())).toBe(1);
    client.close();
  });

  it('exposes Prometheus metrics on each service', async () => {
    for (const name of ['coordinator', 'inference', 'judge', 'aggregation'] as const) {
      const res = await fetch(`http://127.0.0.1:${stack.metricsPorts[name]}/metrics`);
      expect(res.status).toBe(200);
      const text = await res.text();
      // The process metrics under the names the stock Node.js dashboards read; no label of ours
      // named `service` (the scrape's target label: the Prometheus Operator would rename ours).
      expect(text).toMatch(/^process_cpu_user_seconds_total(\{[^}]*\})? \d/m);
      expect(text).toMatch(/^nodejs_eventloop_lag_seconds(\{[^}]*\})? \d/m);
      expect(text).not.toMatch(/[{,]service="/);
    }
    // Every inference series names the model it serves (vLLM's label).
    const inferenceMetrics = await (await fetch(`http://127.0.0.1:${stack.metricsPorts.inference}/metrics`)).text();
    const model = /^axis_inference_model_info\{model_name="([^"]+)"/m.exec(inferenceMetrics)![1];
    const series = inferenceMetrics.split('\n').filter((l) => l && !l.startsWith('#'));
    expect(series.length).toBeGreaterThan(20);
    expect(series.filter((l) => !l.includes(`model_name="${model}"`))).toEqual([]);
    const judgeMetrics = await (await fetch(`http://127.0.0.1:${stack.metricsPorts.judge}/metrics`)).text();
    expect(judgeMetrics).toMatch(/axis_judge_items_total\{[^}]*result="scored"[^}]*\} [1-9]/);
    expect(judgeMetrics).toMatch(/axis_judge_requests_total\{[^}]*outcome="rate_limited"[^}]*\} 2/);
    expect(judgeMetrics).toMatch(/axis_judge_retries_total\{[^}]*reason="server_error"[^}]*\} 2/);
    expect(judgeMetrics).not.toContain('sk-test-secret-key-123');
  });
});
