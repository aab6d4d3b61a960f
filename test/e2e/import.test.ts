import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import { promisify } from 'node:util';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { Tiktoken } from 'js-tiktoken/lite';
import o200kBase from 'js-tiktoken/ranks/o200k_base';
import { RunState } from '../../gen/assistant_axis/v1/coordinator';
import type { LocalStack } from '../../services/cli/stack';
import { coordinatorClient, startRun, startRunError, watchRun } from '../helpers/grpc';
import { readAxis, readRunFiles } from '../kit/runfiles';
import { ROOT, testStack } from '../kit/stack';
import { metricValue } from '../helpers/metrics';

const exec = promisify(execFile);

/**
 * Importing a reference run's responses/ (and scores/) and the two-pass mode, on the synthetic
 * backend (text and activation are pure functions of the conversation and seed) with the
 * offline judge (a fixed rule): an import of a run, or a two-pass run, must give that run's
 * scores and axis, with no generation (import) or with the activation from a prefill (two-pass).
 */
describe('import of a reference run, and two-pass runs', () => {
  let stack: LocalStack;
  let dir: string;
  const request = { roles: ['chef', 'poet', 'default'], questionCount: 4, minCount: 1, seed: 5 };

  beforeAll(async () => {
    ({ stack, dir } = await testStack('import', { args: { judge: ['--provider', 'offline'], inference: ['--synthetic-layers', '4', '--synthetic-hidden', '16'] } }));
    await stack.startAll();
  });

  afterAll(async () => {
    await stack?.stopAll();
  });

  /** Items answered by inference (by RPC) and judged, from the services' own metrics. */
  async function counts(): Promise<Record<string, number>> {
    const inference = `http://${stack.host}:${stack.metricsPorts.inference}/metrics`;
    return {
      Generate: await metricValue(inference, 'axis_inference_items_total', { rpc: 'Generate', outcome: 'ok' }),
      Extract: await metricValue(inference, 'axis_inference_items_total', { rpc: 'Extract', outcome: 'ok' }),
      judged: await metricValue(`http://${stack.host}:${stack.metricsPorts.judge}/metrics`, 'axis_judge_items_total'),
    };
  }

  async function run(name: string, extra: Record<string, unknown> = {}) {
    const client = coordinatorClient(stack.address('coordinator'));
    await startRun(client, { name, ...request, ...extra });
    const final = await watchRun(client, name, () => undefined);
    client.close();
    expect(final.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    return final;
  }

  it('an import measures the answers by Extract, judges only what has no score, generates nothing, and gives the same axis', async () => {
    const original = await run('original');
    const source = path.join(dir, 'reference-run');
    fs.cpSync(path.join(original.outputDir, 'responses'), path.join(source, 'responses'), { recursive: true });
    fs.cpSync(path.join(original.outputDir, 'scores'), path.join(source, 'scores'), { recursive: true });
    // Half of chef's scores are missing: those items are judged again.
    const chefScores = JSON.parse(fs.readFileSync(path.join(source, 'scores', 'chef.json'), 'utf8'));
    const dropped = Object.keys(chefScores).filter((_, i) => i % 2 === 0);
    for (const k of dropped) delete chefScores[k];
    fs.writeFileSync(path.join(source, 'scores', 'chef.json'), JSON.stringify(chefScores));

    const client = coordinatorClient(stack.address('coordinator'));
    const dry = await startRun(client, { name: 'imported', importDir: source, minCount: 1, questionCount: 4, dryRun: true });
    expect(dry.dryRun).toMatchObject({ items: 60, judgePrompts: dropped.length });
    // The prompts hold the real answers, counted with o200k_base (js-tiktoken here, each filled
    // prompt whole): the dry run's count by parts is at least that and at most a token more at
    // each side of each placeholder; 4 characters a token would miss it.
    const encoder = new Tiktoken(o200kBase);
    const evalPrompt = JSON.parse(fs.readFileSync(path.join(ROOT, 'data', 'roles', 'instructions', 'chef.json'), 'utf8')).eval_prompt as string;
    const lines = fs.readFileSync(path.join(source, 'responses', 'chef.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    const toJudge = lines.filter((l) => dropped.includes(`${l.label}_p${l.prompt_index}_q${l.question_index}`));
    expect(toJudge).toHaveLength(dropped.length);
    const low = toJudge.reduce((a, l) => a + encoder.encode(evalPrompt.replace(/\{(question|answer)\}/g, (_m, x) => (x === 'question' ? l.question : l.conversation[l.conversation.length - 1].content))).length, 0);
    const joints = toJudge.length * 2 * (evalPrompt.match(/\{(question|answer)\}/g) ?? []).length;
    expect(dry.dryRun!.estimatedPromptTokens).toBeGreaterThanOrEqual(low);
    expect(dry.dryRun!.estimatedPromptTokens).toBeLessThanOrEqual(low + joints);
    expect(dry.dryRun!.note).toMatch(/^imported answers counted as they are, prompt tokens counted with o200k_base/);
    client.close();

    const before = await counts();
    const imported = await run('imported', { importDir: source, roles: [] });
    const after = await counts();
    expect(after.Generate - before.Generate).toBe(0);
    expect(after.Extract - before.Extract).toBe(60);
    expect(after.judged - before.judged).toBe(dropped.length);
    expect(imported.progress!.aggregated).toBe(60);
    expect(imported.roles.sort()).toEqual(['chef', 'default', 'poet']);

    const a = readRunFiles(original.outputDir);
    const b = readRunFiles(imported.outputDir);
    expect(b.responses).toEqual(a.responses);
    expect(b.scores).toEqual(a.scores);
    const axisA = (await readAxis(original.outputDir)).tensors.axis.data;
    const axisB = (await readAxis(imported.outputDir)).tensors.axis.data;
    expect(Array.from(axisB)).toEqual(Array.from(axisA));
  });

  it('a two-pass run generates the text, then measures it by Extract: the same files and axis', async () => {
    const before = await counts();
    const twoPass = await run('two-pass', { twoPass: true });
    const after = await counts();
    expect(after.Generate - before.Generate).toBe(60);
    expect(after.Extract - before.Extract).toBe(60);
    const original = readRunFiles(path.join(path.dirname(twoPass.outputDir), 'original'));
    expect(readRunFiles(twoPass.outputDir)).toEqual(original);
    const axisA = (await readAxis(path.join(path.dirname(twoPass.outputDir), 'original'))).tensors.axis.data;
    expect(Array.from((await readAxis(twoPass.outputDir)).tensors.axis.data)).toEqual(Array.from(axisA));
  });

  it('refuses a bad import before any work, naming the file and line', async () => {
    const source = path.join(dir, 'reference-run');
    const bad = path.join(dir, 'bad-run');
    const client = coordinatorClient(stack.address('coordinator'));
    const attempt = async (edit: () => void, name: string) => {
      fs.rmSync(bad, { recursive: true, force: true });
      fs.cpSync(source, bad, { recursive: true });
      edit();
      return startRunError(client, { name, importDir: bad, ...request, roles: [] });
    };
    const lines = () => fs.readFileSync(path.join(bad, 'responses', 'poet.jsonl'), 'utf8').trim().split('\n');
    const writeLine = (i: number, edit: (r: any) => void) => {
      const all = lines();
      const r = JSON.parse(all[i]);
      edit(r);
      all[i] = JSON.stringify(r);
      fs.writeFileSync(path.join(bad, 'responses', 'poet.jsonl'), all.join('\n') + '\n');
    };
    let err = await attempt(() => writeLine(2, (r) => (r.question_index = 99)), 'bad-1');
    expect(err.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(err.details).toMatch(/^import_dir: responses\/poet\.jsonl line 3: question_index must be 0\.\.3 \(question_count 4\), got 99$/);
    err = await attempt(() => writeLine(0, (r) => (r.conversation[0].content = 'You are someone else.')), 'bad-2');
    expect(err.details).toMatch(/^import_dir: responses\/poet\.jsonl line 1: the conversation is not the one data_dir and the model give for prompt 0, question 0/);
    err = await attempt(() => writeLine(1, (r) => r.conversation.pop()), 'bad-3');
    expect(err.details).toMatch(/line 2: the conversation's last message must be the assistant's answer/);
    err = await attempt(() => fs.writeFileSync(path.join(bad, 'scores', 'poet.json'), JSON.stringify({ pos_p0_q0: 7 })), 'bad-4');
    expect(err.details).toMatch(/^import_dir: scores\/poet\.json: pos_p0_q0 must be a score 0\.\.3, got 7$/);
    err = await startRunError(client, { name: 'bad-5', importDir: source, ...request, roles: ['chef', 'gardener'] });
    expect(err.details).toMatch(/^import_dir: no responses\/<role>\.jsonl for gardener \(it has chef, default, poet\)$/);
    err = await startRunError(client, { name: 'bad-6', importDir: path.join(dir, 'nowhere'), ...request });
    expect(err.details).toMatch(/has no responses\/ directory/);
    err = await startRunError(client, { name: 'bad-7', importDir: source, ...request, twoPass: true });
    expect(err.details).toMatch(/^two_pass: an imported run generates nothing/);
    client.close();
    // Nothing was created for the refused runs.
    for (let i = 1; i <= 7; i++) expect(fs.existsSync(path.join(dir, 'outputs', `bad-${i}`))).toBe(false);
  });

  it('the axis CLI starts a run with a progress bar and its summary, lists it, and says what is wrong', async () => {
    const cli = (args: string[]) =>
      exec(process.execPath, [path.join(ROOT, 'dist/services/cli/axis.js'), ...args, '--coordinator', stack.address('coordinator')], { timeout: 60_000 }).then(
        (r) => ({ code: 0, ...r }),
        (e) => ({ code: e.code as number, stdout: e.stdout as string, stderr: e.stderr as string }),
      );
    const run = await cli(['run', 'from-cli', '--roles', 'chef,default', '--question-count', '2', '--min-count', '1']);
    expect(run.code).toBe(0);
    expect(run.stderr).toMatch(/\[#+\] 100% 20\/20 items \| generated 20 judged 10\/10 .* \| SUCCEEDED/);
    expect(run.stdout).toMatch(/^run from-cli: SUCCEEDED/);
    expect(run.stdout).toMatch(/roles kept \(score-3 items >= min_count 1\)/);
    const again = await cli(['run', 'from-cli', '--roles', 'chef,default', '--question-count', '2', '--min-count', '1']);
    expect(again.stderr).toMatch(/already complete/);
    expect((await cli(['list'])).stdout).toMatch(/from-cli\s+SUCCEEDED\s+20\/20 items/);
    const dry = await cli(['run', 'dry', '--roles', 'chef', '--question-count', '2', '--dry-run']);
    expect(dry.stdout).toMatch(/items: 10\n\s+judge prompts: 10/);
    const badFlag = await cli(['run', 'x', '--question-count', 'ten']);
    expect(badFlag.code).toBe(2);
    expect(badFlag.stderr).toMatch(/--question-count must be a whole number, got "ten"/);
    // A token goes in plaintext only to this machine: elsewhere the CLI refuses before connecting.
    const tokenFile = path.join(dir, 'cli-token');
    fs.writeFileSync(tokenFile, 'not-a-real-token\n');
    const remote = await exec(process.execPath, [path.join(ROOT, 'dist/services/cli/axis.js'), 'list', '--token-file', tokenFile, '--coordinator', '10.255.255.1:50051'], { timeout: 60_000 }).catch((e) => e);
    expect(remote.code).toBe(2);
    expect(remote.stderr).toMatch(/--token-file: refusing to send the token in plaintext to 10\.255\.255\.1:50051, which is not this machine: give --tls-ca/);
    expect((await cli(['list', '--token-file', tokenFile])).stdout).toMatch(/from-cli\s+SUCCEEDED/);
    const refused = await cli(['run', 'from-cli', '--roles', 'poet']);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/^axis: ALREADY_EXISTS: name: run "from-cli" already exists with other parameters/);

    // axis pull: the run's files as the coordinator holds them, byte for byte; again: nothing to
    // pull; a changed file and one cut short (its .partial) are pulled again, the rest kept.
    const source = path.join(stack.opts.outputRoot, 'from-cli');
    const listing = (root: string): string[] => fs.readdirSync(root, { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).map((e) => path.relative(root, path.join(e.parentPath, e.name))).sort();
    const out = path.join(dir, 'pulled');
    const pulled = await cli(['pull', 'from-cli', '--out', out]);
    expect(pulled.code).toBe(0);
    const files = listing(source);
    expect(files).toEqual(expect.arrayContaining(['axis.safetensors', 'manifest.json', 'report.json', 'vectors/chef.safetensors']));
    expect(listing(out)).toEqual(files);
    for (const f of files) expect(fs.readFileSync(path.join(out, f)).equals(fs.readFileSync(path.join(source, f)))).toBe(true);
    expect(pulled.stdout).toMatch(new RegExp(`^run from-cli in ${out}: ${files.length} files pulled \\([0-9.]+ MiB\\), 0 already here`));
    fs.writeFileSync(path.join(out, 'manifest.json'), '{}');
    const axisBytes = fs.readFileSync(path.join(source, 'axis.safetensors'));
    fs.rmSync(path.join(out, 'axis.safetensors'));
    fs.writeFileSync(path.join(out, 'axis.safetensors.partial'), axisBytes.subarray(0, 100));
    const repull = await cli(['pull', 'from-cli', '--out', out]);
    expect(repull.stdout).toMatch(`2 files pulled`);
    expect(repull.stdout).toMatch(`${files.length - 2} already here`);
    expect(fs.readFileSync(path.join(out, 'axis.safetensors')).equals(axisBytes)).toBe(true);
    expect(fs.readFileSync(path.join(out, 'manifest.json')).equals(fs.readFileSync(path.join(source, 'manifest.json')))).toBe(true);
    expect(listing(out)).toEqual(files);
    // A path that leaves the run's directory, a file it does not have, a run that does not exist.
    const client = coordinatorClient(stack.address('coordinator'));
    const fetch = (run: string, p: string) =>
      new Promise<grpc.ServiceError>((resolve) => {
        const call = client.getArtifact({ run, path: p, offset: 0 }, new grpc.Metadata());
        call.on('data', () => undefined);
        call.on('error', resolve);
        call.on('end', () => resolve({ code: grpc.status.OK } as grpc.ServiceError));
      });
    expect(await fetch('from-cli', '../from-cli/manifest.json')).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, details: expect.stringMatching(/^path: "\.\.\/from-cli\/manifest\.json" is not a path inside the run's directory/) });
    expect(await fetch('from-cli', '/etc/passwd')).toMatchObject({ code: grpc.status.INVALID_ARGUMENT });
    expect(await fetch('from-cli', 'nothing.json')).toMatchObject({ code: grpc.status.NOT_FOUND });
    expect(await fetch('no-such-run', 'manifest.json')).toMatchObject({ code: grpc.status.NOT_FOUND });
    // A link inside the run's directory that leads out of it is refused.
    fs.symlinkSync('/etc/hostname', path.join(source, 'outside.txt'));
    expect(await fetch('from-cli', 'outside.txt')).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, details: expect.stringMatching(/leads out of the run's directory/) });
    fs.rmSync(path.join(source, 'outside.txt'));
    client.close();
  });
});
