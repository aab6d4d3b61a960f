import * as grpc from '@grpc/grpc-js';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { RunState } from '../../gen/assistant_axis/v1/coordinator';
import { InferenceServiceClient } from '../../gen/assistant_axis/v1/inference';
import type { LocalStack } from '../../services/cli/stack';
import { checkHealth } from '../../services/shared/health';
import { readSafetensors } from '../../services/shared/safetensors';
import { FakeOpenAIServer } from '../doubles/openai-server';
import { coordinatorClient, startRun, waitFor, watchRun } from '../helpers/grpc';
import { tinyLlama } from '../helpers/model';
import { readAxis, readRunFiles } from '../kit/runfiles';
import { freePort, ROOT, testStack, UPSTREAM_DATA } from '../kit/stack';
import { LoadedModel } from '../../services/inference/onnx/model';
import { projectTurns, renderTurns } from '../../services/inference/onnx/projection';
import { DecoderSession } from '../../services/inference/onnx/session';
import { unitRows } from '../../services/shared/projection';
import { writeSafetensors } from '../../services/shared/safetensors';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { tempDir } from '../kit/files';

const REQUEST = { roles: ['chef', 'poet', 'default'], questionCount: 3, minCount: 1, maxNewTokens: 16, seed: 3 };

describe('end to end through the ONNX backend on a tiny llama', () => {
  let stack: LocalStack;
  let modelDir: string;
  const judge = new FakeOpenAIServer();

  let capping: string;
  beforeAll(async () => {
    ({ modelDir } = await tinyLlama());
    await judge.start();
    // A capping config of the tiny model (4 layers x 64): layers 1 and 2 capped at 0 along fixed vectors, and one capping nothing.
    capping = path.join(tempDir('onnx-capping'), 'capping');
    const v = (seed: number) => Float32Array.from({ length: 64 }, (_, i) => Math.sin(seed + i * 0.37));
    fs.writeFileSync(`${capping}.json`, JSON.stringify({ format: 'assistant-axis-capping/1', vectors: { a: { layer: 1 }, b: { layer: 2 } }, experiments: [{ id: 'cap', interventions: [{ vector: 'a', cap: 0 }, { vector: 'b', cap: 0 }] }, { id: 'open', interventions: [{ vector: 'a', cap: 'inf' }] }] }));
    await writeSafetensors(`${capping}.safetensors`, { a: { shape: [64], data: v(1) }, b: { shape: [64], data: v(2) } });
    ({ stack } = await testStack('onnx', {
      args: {
        inference: ['--backend', 'onnx', '--model-dir', modelDir, '--capping-config', capping],
        judge: ['--provider', 'openai', '--base-url', judge.baseUrl],
      },
    }));
    await stack.startAll();
  });

  afterAll(async () => {
    await stack?.stopAll();
    await judge.stop();
  });

  it('runs to an axis with the model recorded in the manifest, the same text for the same seed', async () => {
    const client = coordinatorClient(stack.address('coordinator'));
    await startRun(client, { name: 'onnx-a', ...REQUEST });
    const a = await watchRun(client, 'onnx-a', () => undefined);
    expect(a.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    expect(a.backend).toBe('onnx');
    expect(a.model).toBe('tiny-llama');
    const files = readRunFiles(a.outputDir);
    for (const role of REQUEST.roles) {
      expect(files.responses[role]).toHaveLength(15);
      // The llama template renders system messages: the instruction stays a system message.
      const first = files.responses[role][3]; // prompt 1 (default.json's prompt 0 is empty: no system message)
      expect(first.conversation[0].role).toBe('system');
      expect(first.conversation[2].role).toBe('assistant');
    }
    const manifest = JSON.parse(fs.readFileSync(path.join(a.outputDir, 'manifest.json'), 'utf8'));
    expect(manifest.model).toMatchObject({ backend: 'onnx', architecture: 'llama', num_layers: 4, hidden_size: 64, device: 'cpu', short_name: 'Llama' });
    for (const h of ['graph', 'weights', 'chat_template']) expect(manifest.model.hashes[h]).toMatch(/^[0-9a-f]{64}$/);
    expect(manifest.sampling.max_new_tokens).toBe(16);

    // The axis is the mean of the default vector minus the mean of the kept role vectors.
    const axis = (await readAxis(a.outputDir)).tensors.axis;
    expect(axis.shape).toEqual([4, 64]);
    const kept = a.summary!.kept.map((k) => k.role);
    expect(kept.length).toBeGreaterThan(0);
    const vec = async (role: string) => (await readSafetensors(path.join(a.outputDir, 'vectors', `${role}.safetensors`))).tensors.vector.data;
    const def = await vec('default');
    const roles = await Promise.all(kept.map(vec));
    let worst = 0;
    for (let i = 0; i < axis.data.length; i++) {
      const expected = def[i] - roles.reduce((s, r) => s + r[i], 0) / roles.length;
      worst = Math.max(worst, Math.abs(axis.data[i] - expected));
    }
    expect(worst).toBeLessThanOrEqual(1e-5);
    expect(axis.data.every(Number.isFinite)).toBe(true);

    await startRun(client, { name: 'onnx-b', ...REQUEST });
    const b = await watchRun(client, 'onnx-b', () => undefined);
    expect(readRunFiles(b.outputDir).responses).toEqual(files.responses);

    // Thinking asked for: recorded in the manifest and part of the run's identity; the llama
    // template has no switch, so the answers are the same.
    await startRun(client, { name: 'onnx-think', ...REQUEST, enableThinking: true });
    const t = await watchRun(client, 'onnx-think', () => undefined);
    expect(t.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    expect(JSON.parse(fs.readFileSync(path.join(t.outputDir, 'manifest.json'), 'utf8')).sampling).toMatchObject({ enable_thinking: true });
    expect(manifest.sampling).toMatchObject({ enable_thinking: false });
    expect(readRunFiles(t.outputDir).responses).toEqual(files.responses);
    await expect(startRun(client, { name: 'onnx-think', ...REQUEST })).rejects.toThrow(/already exists with other parameters \(enableThinking\)/);
    client.close();
  });

  it('generates a run with a capping experiment: recorded in the manifest, other answers than without, the same with caps at +infinity', async () => {
    const client = coordinatorClient(stack.address('coordinator'));
    if ((await watchRun(client, 'onnx-a', () => undefined).catch(() => undefined))?.state !== RunState.RUN_STATE_SUCCEEDED) {
      await startRun(client, { name: 'onnx-a', ...REQUEST });
      await watchRun(client, 'onnx-a', () => undefined);
    }
    const plain = readRunFiles(path.join(stack.opts.outputRoot, 'onnx-a')).responses;
    // compare_run must name a finished run of this coordinator, by a valid name.
    await expect(startRun(client, { name: 'onnx-capped', ...REQUEST, cappingExperiment: 'cap', compareRun: 'never-ran' })).rejects.toThrow(/compare_run: "never-ran" is not a finished run here \(.*never-ran has no axis\.safetensors, manifest\.json\)/);
    await expect(startRun(client, { name: 'onnx-capped', ...REQUEST, cappingExperiment: 'cap', compareRun: '../onnx-a' })).rejects.toThrow(/compare_run: /);
    await startRun(client, { name: 'onnx-capped', ...REQUEST, cappingExperiment: 'cap', compareRun: 'onnx-a' });
    const capped = await watchRun(client, 'onnx-capped', () => undefined);
    expect(capped.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    const manifest = JSON.parse(fs.readFileSync(path.join(capped.outputDir, 'manifest.json'), 'utf8'));
    expect(manifest.capping).toMatchObject({ experiment: 'cap', config: `${capping}.json` });
    expect(manifest.capping.config_sha256).toMatch(/^[0-9a-f]{64}$/);
    expect(readRunFiles(capped.outputDir).responses).not.toEqual(plain);

    // The report against the uncapped run: every vector of both runs on onnx-a's unit axis at
    // the target layer, recomputed here in float64 from the two runs' files.
    const plainDir = path.join(stack.opts.outputRoot, 'onnx-a');
    const report = JSON.parse(fs.readFileSync(path.join(capped.outputDir, 'report.json'), 'utf8'));
    const c = report.compare_run;
    expect(c).toMatchObject({ name: 'onnx-a', row: report.target_layer, layer: report.target_layer, capping: { this: 'cap', other: 'none' } });
    const row = report.target_layer as number;
    const frameRow = Array.from((await readAxis(plainDir)).tensors.axis.data.subarray(row * 64, (row + 1) * 64));
    const frameNorm = Math.sqrt(frameRow.reduce((s, x) => s + x * x, 0));
    const on = async (dir: string, role: string) => {
      const file = path.join(dir, 'vectors', `${role}.safetensors`);
      if (!fs.existsSync(file)) return null;
      const v = (await readSafetensors(file)).tensors.vector.data;
      return frameRow.reduce((s, x, i) => s + (x / frameNorm) * v[row * 64 + i], 0);
    };
    const manifests = [capped.outputDir, plainDir].map((d) => JSON.parse(fs.readFileSync(path.join(d, 'manifest.json'), 'utf8')));
    const listed = (m: { results: { roles_kept: { role: string }[]; defaults: { role: string }[] } }) => [...m.results.roles_kept, ...m.results.defaults].map((r) => r.role);
    const roles = [...new Set([...listed(manifests[0]), ...listed(manifests[1])])];
    expect(c.roles.map((r: { role: string }) => r.role).sort()).toEqual([...roles].sort());
    expect(c.roles.length).toBeGreaterThanOrEqual(2);
    for (const r of c.roles as { role: string; this: number | null; other: number | null }[]) {
      const [mine, theirs] = [await on(capped.outputDir, r.role), await on(plainDir, r.role)];
      for (const [got, want] of [[r.this, mine], [r.other, theirs]]) {
        if (want === null) expect(got).toBeNull();
        else expect(Math.abs(got! - want)).toBeLessThanOrEqual(1e-5 * Math.max(1, Math.abs(want)));
      }
    }
    const both = c.roles.filter((r: { kind: string; this: number | null; other: number | null }) => r.kind === 'role' && r.this !== null && r.other !== null);
    const shift = both.reduce((s: number, r: { this: number; other: number }) => s + r.this - r.other, 0) / Math.max(1, both.length);
    expect(c.mean.roles.count).toBe(both.length);
    expect(Math.abs(c.mean.roles.shift - shift)).toBeLessThanOrEqual(1e-6);
    // Both runs' judge scores, pooled over their role-play roles (each run's report holds its histograms).
    const pooled = (dir: string, m: { results: { roles_kept: { role: string }[]; roles_left_out: { role: string }[] } }) => {
      const h = JSON.parse(fs.readFileSync(path.join(dir, 'report.json'), 'utf8')).histograms as Record<string, Record<string, number>>;
      const total: Record<string, number> = {};
      for (const { role } of [...m.results.roles_kept, ...m.results.roles_left_out]) for (const [k, n] of Object.entries(h[role] ?? {})) total[k] = (total[k] ?? 0) + n;
      return total;
    };
    expect(c.scores).toEqual({ this: pooled(capped.outputDir, manifests[0]), other: pooled(plainDir, manifests[1]) });
    expect(Object.values(c.scores.this as Record<string, number>).reduce((a, b) => a + b, 0)).toBe(2 * 3 * 5);
    expect(fs.readFileSync(path.join(capped.outputDir, 'report.html'), 'utf8')).toContain('<h2>Against run onnx-a</h2>');
    await startRun(client, { name: 'onnx-open', ...REQUEST, cappingExperiment: 'open' });
    const open = await watchRun(client, 'onnx-open', () => undefined);
    expect(readRunFiles(open.outputDir).responses).toEqual(plain);
    // An experiment the replicas do not have is refused, naming it and those they have.
    await expect(startRun(client, { name: 'onnx-nope', ...REQUEST, cappingExperiment: 'nope' })).rejects.toThrow(/capping_experiment: "nope" is not an experiment of .*capping\.json \(it has cap, open\)/);
    client.close();
  }, 300_000);

  it('projects transcripts on a finished run\'s axis through the coordinator: axis project writes projections.json and .html, a bad file gets its error', async () => {
    const client = coordinatorClient(stack.address('coordinator'));
    if ((await watchRun(client, 'onnx-a', () => undefined).catch(() => undefined))?.state !== RunState.RUN_STATE_SUCCEEDED) {
      await startRun(client, { name: 'onnx-a', ...REQUEST });
      await watchRun(client, 'onnx-a', () => undefined);
    }
    const dir = tempDir('project-cli');
    // The first turns of two persona-drift conversations (their other fields kept), and a file that is not JSON.
    const transcripts = path.join(path.dirname(UPSTREAM_DATA), 'transcripts', 'persona_drift');
    const files = ['therapy.json', 'coding.json'].map((f) => {
      const t = JSON.parse(fs.readFileSync(path.join(transcripts, f), 'utf8'));
      const out = path.join(dir, f);
      fs.writeFileSync(out, JSON.stringify({ ...t, conversation: t.conversation.slice(0, 6) }));
      return out;
    });
    fs.writeFileSync(path.join(dir, 'broken.json'), '{"conversation": [');
    const out = path.join(dir, 'out');
    const cli = await promisify(execFile)(process.execPath, [path.join(ROOT, 'dist/services/cli/axis.js'), 'project', ...files, path.join(dir, 'broken.json'), '--axis-run', 'onnx-a', '--out', out, '--coordinator', stack.address('coordinator')], { timeout: 120_000 }).then(
      (r) => ({ code: 0, ...r }),
      (e) => ({ code: e.code as number, stdout: e.stdout as string, stderr: e.stderr as string }),
    );
    expect(cli.code).toBe(1);
    expect(cli.stdout).toContain('(1 of 3 files not projected)');
    const projections = JSON.parse(fs.readFileSync(path.join(out, 'projections.json'), 'utf8'));
    expect(Object.keys(projections)).toEqual(['therapy.json', 'coding.json', 'broken.json']);
    expect(projections['broken.json'].error).toMatch(/broken\.json: not valid JSON/);
    // The same numbers as the projection module gives with the run's axis (its accuracy is projection.test.ts's).
    const axis = (await readAxis(path.join(stack.opts.outputRoot, 'onnx-a'))).tensors.axis;
    const model = await LoadedModel.load(modelDir);
    const session = await DecoderSession.load(modelDir);
    try {
      for (const f of files) {
        const t = JSON.parse(fs.readFileSync(f, 'utf8'));
        const entry = projections[path.basename(f)];
        expect(entry).toMatchObject({ model: t.model, persona: t.persona, projected_with: 'tiny-llama', target_layer: 2, layers: [0, 1, 2, 3] });
        expect(entry.conversation).toBeUndefined();
        const want = await projectTurns(session, renderTurns(model, t.conversation, false), { unit: unitRows(axis.data, 4, 64), layers: [0, 1, 2, 3], targetRow: 2 }, { chunk: 512, tokenProjections: false });
        expect(entry.turns.map((x: { message: number }) => x.message)).toEqual([1, 3, 5]);
        entry.turns.forEach((x: { projection: number; layers: number[] }, k: number) => {
          expect(x.projection).toBeCloseTo(want[k].projections[2], 4);
          x.layers.forEach((p, l) => expect(p).toBeCloseTo(want[k].projections[l], 4));
        });
      }
    } finally {
      await session.close();
      await model.close();
    }
    const html = fs.readFileSync(path.join(out, 'projections.html'), 'utf8');
    expect(html.match(/<svg /g)).toHaveLength(2);
    expect(html).toContain('Not projected:');

    // Bad requests: both axes named, a run that is not there, a run not finished, an axis file outside the data roots.
    const project = (req: object) => new Promise<grpc.ServiceError>((resolve) => client.projectConversation({ messages: [{ role: 'user', content: 'hi' }, { role: 'assistant', content: 'hello' }], axisRun: '', axisFile: '', layers: [], tokenProjections: false, enableThinking: false, model: '', ...req }, (err) => resolve(err!)));
    expect((await project({ axisRun: 'onnx-a', axisFile: '/x.safetensors' })).details).toMatch(/^axis_run, axis_file: name exactly one/);
    expect((await project({ axisRun: 'no-such-run' })).code).toBe(grpc.status.NOT_FOUND);
    expect((await project({ axisRun: 'onnx-a', layers: [9] })).details).toMatch(/^layers: the axis \(run onnx-a\) has no row for layer 9/);
    expect((await project({ axisFile: path.join(dir, 'missing.safetensors') })).details).toMatch(/^axis_file: .*missing\.safetensors: no such file/);
    expect((await project({ axisRun: 'onnx-a', messages: [{ role: 'user', content: 'hi' }] })).details).toMatch(/^inference .*: messages: no assistant turn to project/);
    // A run still going has no axis yet.
    await startRun(client, { name: 'onnx-going', ...REQUEST, questionCount: 20, roles: [] });
    const going = await project({ axisRun: 'onnx-going' });
    expect(going.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(going.details).toMatch(/^axis_run: run "onnx-going" is (pending|running), not finished: it has no axis yet/);
    await new Promise((resolve) => client.cancelRun({ name: 'onnx-going' }, resolve));
    // The trajectories are drawn over where the axis run's own answers lie.
    expect(html).toContain('default answers (P25..P75)');
    client.close();
  }, 300_000);
});

describe('an inference service whose model cannot load', () => {
  it('stays up and not ready, and says why in GetModelInfo and its log', async () => {
    const dir = tempDir('nomodel');
    const port = await freePort();
    const log = path.join(dir, 'inference.log');
    const fd = fs.openSync(log, 'w');
    const child = spawn(process.execPath, [path.join(ROOT, 'dist/services/inference/main.js'), '--port', String(port), '--metrics-port', String(await freePort()), '--backend', 'onnx', '--model-dir', dir], { stdio: ['ignore', fd, fd] });
    try {
      const address = `127.0.0.1:${port}`;
      await waitFor('the service to answer', async () => ((await checkHealth(address)) === 'NOT_SERVING' ? true : undefined), 20_000);
      await waitFor('the load to fail', async () => (fs.readFileSync(log, 'utf8').includes('model failed to load') ? true : undefined), 20_000);
      expect(await checkHealth(address)).toBe('NOT_SERVING');
      const client = new InferenceServiceClient(address, grpc.credentials.createInsecure());
      const err = await new Promise<grpc.ServiceError>((resolve) => client.getModelInfo({}, (e) => resolve(e!)));
      expect(err.code).toBe(grpc.status.FAILED_PRECONDITION);
      expect(err.details).toMatch(/model not loaded: .*axis_model\.json: missing/);
      expect(fs.readFileSync(log, 'utf8')).toMatch(/axis_model\.json: missing/);
      client.close();
    } finally {
      child.kill('SIGKILL');
    }
  });
});
