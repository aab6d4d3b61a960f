/**
 * The GPU kit (bench/gpu/) on the CPU, as a device session would use it: packed in parts, the
 * parts checked and put together, and the kit's own Node running the engine's half from a folder
 * that sees nothing of this checkout (CUDA aside: the CPU and an f16 build). The provider
 * libraries and onnxruntime-node 1.29.0 come from the npm registry in a real pack; here stand-ins
 * (two files of random bytes, this checkout's onnxruntime-node) keep the test off the network.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { relativeError as maxRelative, referenceForward } from '../reference/forward';
import { tempDir } from '../kit/files';
import { UPSTREAM_DATA } from '../kit/stack';

const ROOT = path.resolve(__dirname, '..', '..');
const PART_MIB = 24;
const sha256 = (file: string) => createHash('sha256').update(fs.readFileSync(file)).digest('hex');
const f32 = (s: string) => {
  const b = Buffer.from(s, 'base64');
  return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
};

describe('the GPU kit (bench/gpu)', () => {
  let dir: string;
  let parts: string;
  let kit: string;
  const provider: Record<string, string> = {};

  beforeAll(() => {
    dir = tempDir('gpu-kit');
    const fake = path.join(dir, 'provider');
    fs.mkdirSync(fake);
    for (const name of ['libonnxruntime_providers_cuda.so', 'libonnxruntime_providers_shared.so']) {
      fs.writeFileSync(path.join(fake, name), randomBytes(name.includes('cuda') ? 30 * 2 ** 20 : 2 ** 16));
      provider[name] = sha256(path.join(fake, name));
    }
    parts = path.join(dir, 'parts');
    execFileSync('bench/gpu/pack.sh', [parts], {
      cwd: ROOT,
      stdio: ['ignore', 'ignore', 'pipe'],
      env: {
        ...process.env,
        AXIS_UPSTREAM_DATA: UPSTREAM_DATA,
        AXIS_GPU_KIT_PART_MIB: String(PART_MIB),
        AXIS_GPU_KIT_PROVIDER_DIR: fake,
        AXIS_GPU_KIT_ORT_DIR: path.join(ROOT, 'node_modules', 'onnxruntime-node'),
        AXIS_GPU_KIT_COMMON_DIR: path.join(ROOT, 'node_modules', 'onnxruntime-common'),
        AXIS_GPU_KIT_XZ_LEVEL: '0',
      },
    });
  }, 600_000);

  test('the parts are each small enough for one device call, and SHA256SUMS holds each and the whole', () => {
    const names = fs.readdirSync(parts).filter((n) => n.startsWith('part-')).sort();
    expect(names.length).toBeGreaterThan(1);
    const sums = Object.fromEntries(fs.readFileSync(path.join(parts, 'SHA256SUMS'), 'utf8').trim().split('\n').map((l) => l.split(/\s+/).reverse()));
    for (const n of names) {
      expect(fs.statSync(path.join(parts, n)).size).toBeLessThanOrEqual(PART_MIB * 2 ** 20);
      expect(sums[n]).toBe(sha256(path.join(parts, n)));
    }
    const whole = createHash('sha256');
    for (const n of names) whole.update(fs.readFileSync(path.join(parts, n)));
    expect(sums['kit.tar.xz']).toBe(whole.digest('hex'));
  });

  test('unpack.sh refuses a missing or damaged part, naming it, and unpacks nothing', () => {
    const broken = path.join(dir, 'broken');
    fs.cpSync(parts, broken, { recursive: true });
    fs.rmSync(path.join(broken, 'part-01'));
    let r = spawnSync(path.join(ROOT, 'bench/gpu/unpack.sh'), [broken, path.join(dir, 'out-missing')], { encoding: 'utf8' });
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/parts missing .*part-01/);
    expect(fs.existsSync(path.join(dir, 'out-missing', 'kit'))).toBe(false);

    fs.copyFileSync(path.join(parts, 'part-01'), path.join(broken, 'part-01'));
    const fd = fs.openSync(path.join(broken, 'part-00'), 'r+');
    fs.writeSync(fd, Buffer.from([0x42]), 0, 1, 1000);
    fs.closeSync(fd);
    r = spawnSync(path.join(ROOT, 'bench/gpu/unpack.sh'), [broken, path.join(dir, 'out-damaged')], { encoding: 'utf8' });
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/parts damaged .*: part-00$/m);
    expect(fs.existsSync(path.join(dir, 'out-damaged', 'kit'))).toBe(false);
  });

  test('unpacked, it holds Node, the provider beside onnxruntime\'s library, one platform\'s binaries and the answer lengths', () => {
    const r = spawnSync(path.join(ROOT, 'bench/gpu/unpack.sh'), [parts, path.join(dir, 'device')], { encoding: 'utf8' });
    expect(r.stderr).toMatch(/unpacked to/);
    expect(r.status).toBe(0);
    kit = path.join(dir, 'device', 'kit');
    expect(sha256(path.join(kit, 'node/bin/node'))).toBe(sha256(fs.realpathSync(process.execPath)));
    const binding = path.join(kit, 'app/node_modules/onnxruntime-node/bin/napi-v6');
    for (const [name, sum] of Object.entries(provider)) expect(sha256(path.join(binding, 'linux/x64', name))).toBe(sum);
    expect(fs.existsSync(path.join(binding, 'linux/x64/libonnxruntime.so.1'))).toBe(true);
    expect(fs.readdirSync(binding)).toEqual(['linux']);
    expect(fs.readdirSync(path.join(binding, 'linux'))).toEqual(['x64']);
    // The real transcripts' assistant answers, one length each.
    const transcripts = path.join(path.dirname(UPSTREAM_DATA), 'transcripts', 'persona_drift');
    const answers = fs.readdirSync(transcripts).filter((n) => n.endsWith('.json')).flatMap((n) => (JSON.parse(fs.readFileSync(path.join(transcripts, n), 'utf8')) as { conversation: { role: string }[] }).conversation.filter((m) => m.role === 'assistant'));
    const lengths = JSON.parse(fs.readFileSync(path.join(kit, 'answer_lengths.json'), 'utf8')) as number[];
    expect(lengths).toHaveLength(answers.length);
    expect(Math.min(...lengths)).toBeGreaterThan(0);
  });

  test('the kit\'s own Node runs the engine\'s half outside this checkout, and its report agrees with a float64 forward pass', () => {
    expect(kit).toBeDefined();
    const work = path.join(dir, 'work');
    const node = path.join(kit, 'node/bin/node');
    const engine = path.join(kit, 'app/dist/bench/gpu/engine.js');
    // No NODE_PATH, and a working folder outside the checkout: only the kit's packages can load.
    const env = { PATH: process.env.PATH!, HOME: work };
    fs.mkdirSync(work);
    const run = (...args: string[]) => execFileSync(node, [engine, ...args], { cwd: work, env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    run('base', '--arch', 'llama', '--out', 'ckpt');
    run('build', '--hf', 'ckpt', '--out', 'model', '--dtype', 'f16');
    run('measure', '--model', 'model', '--device', 'cpu', '--out', 'engine.json', '--lengths', path.join(kit, 'answer_lengths.json'), '--items', '12', '--cap', '24', '--extract', '6', '--max-slots', '4', '--repeats', '2');
    const e = JSON.parse(fs.readFileSync(path.join(work, 'engine.json'), 'utf8'));
    expect(e.plan.slots).toBe(4);
    expect(e.generate.items).toHaveLength(12);
    expect(Math.max(...e.generate.items.map((i: { budget: number }) => i.budget))).toBeLessThanOrEqual(24);
    // 12 items over 4 slots: each run's first 4 prompts alone, and prompts joining the steps after.
    expect(e.join_prompts).toBe(true);
    for (const r of e.generate.runs) {
      expect(r.prompts_joined + r.prompts_alone).toBe(12);
      expect(r.prompts_joined).toBeGreaterThan(0);
    }

    // transformers' side, computed here by the float64 reference forward over the same ids.
    const ckpt = path.join(work, 'ckpt');
    const L = e.model.num_layers;
    const d = e.model.hidden_size;
    const V = e.model.vocab_size;
    let worst = 0;
    const agree: number[] = [];
    const correctness = e.correctness.map((c: { ids: number[]; weights: number[]; prompt_ids: number[]; greedy_ids: number[]; mean: string }) => {
      const { hidden, logits } = referenceForward(ckpt, c.ids);
      const total = c.weights.reduce((a, b) => a + b, 0);
      const means = hidden.map((h) => {
        const m = new Float32Array(d);
        c.weights.forEach((w, t) => {
          for (let x = 0; x < d; x++) m[x] += (w * h[t * d + x]) / total;
        });
        return m;
      });
      const ours = f32(c.mean);
      means.forEach((m, l) => (worst = Math.max(worst, Math.hypot(...ours.subarray(l * d, (l + 1) * d).map((v, x) => v - m[x])) / Math.hypot(...m))));
      expect(maxRelative(ours.subarray(0, d), means[0])).toBeLessThan(2e-2);
      // Greedy by teacher forcing: the reference's argmax after each prefix of the engine's answer.
      const greedy: number[] = [];
      for (let t = c.prompt_ids.length - 1; t < c.ids.length - 1; t++) {
        let best = 0;
        for (let v = 1; v < V; v++) if (logits[t * V + v] > logits[t * V + best]) best = v;
        greedy.push(best);
      }
      let same = 0;
      while (same < greedy.length && greedy[same] === c.greedy_ids[same]) same++;
      agree.push(same);
      return { greedy_ids: greedy, means: means.map((m) => Buffer.from(m.buffer).toString('base64')) };
    });
    expect(worst).toBeLessThan(2e-2); // f16 against float64
    const hf = {
      gpu: 'NVIDIA H200',
      correctness,
      extract: { tokens: e.extract.tokens, seconds: [4, 2, 3], batch: 16 },
      generate: { tokens: e.generate.items.reduce((n: number, i: { budget: number }) => n + i.budget, 0), seconds: [9, 7, 8], batch: 4, compiled: false },
    };
    fs.writeFileSync(path.join(work, 'hf.json'), JSON.stringify(hf));
    // A bandwidth that makes this CPU's figure readable (the GPU's comes from its name).
    const lines = run('report', '--engine', 'engine.json', '--hf', 'hf.json', '--bandwidth', '1e9').trim().split('\n');
    const result = (name: string) => lines.find((l) => l.startsWith(`result: ${name} = `))?.split(' = ')[1];
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
    expect(Math.abs(Number(result('gpu_hidden_rel_err')) / worst - 1)).toBeLessThan(0.01);
    expect(result('gpu_greedy_agreement')).toBe(`${Math.min(...agree)} / 32`);
    expect(result('gpu_extract_vs_hf')).toBe(`${(e.extract.tokens / median(e.extract.seconds) / (e.extract.tokens / 3)).toFixed(2)} x`);
    const genEngine = median(e.generate.runs.map((r: { tokens: number; seconds: number }) => r.tokens / r.seconds));
    expect(result('gpu_generate_vs_hf')).toBe(`${(genEngine / (hf.generate.tokens / 8)).toFixed(2)} x`);
    // Each step reads the weights once and each row's keys and values so far (f16: 2 bytes).
    const run0 = e.generate.runs.find((r: { tokens: number; seconds: number }) => r.tokens / r.seconds === genEngine);
    const kv = e.generate.items.reduce((n: number, i: { budget: number; prompt_ids: number[] }) => n + i.budget * i.prompt_ids.length + (i.budget * (i.budget + 1)) / 2, 0);
    const config = JSON.parse(fs.readFileSync(path.join(ckpt, 'config.json'), 'utf8'));
    const weights = fs.statSync(path.join(work, 'model', JSON.parse(fs.readFileSync(path.join(work, 'model', 'axis_model.json'), 'utf8')).weights)).size;
    const bytes = run0.steps * weights + kv * 2 * L * config.num_key_value_heads * config.head_dim * 2;
    expect(Number(result('gpu_generate_vs_bandwidth_limit'))).toBeCloseTo(bytes / 1e9 / run0.seconds, 2);
    expect(lines.find((l) => l.startsWith('generation with capture: '))).toMatch(/transformers generate \(static cache, eager decoding step: its compile failed\) at batch 4 /);
    expect(lines).toContain(`engine: native step runtime, tokens drawn by the host, prompts joining a decoding step's run (${e.generate.runs.map((r: { prompts_joined: number }) => `${r.prompts_joined} of 12`).join(', ')} per generation run)`);
  }, 300_000);

  test('run.sh measures from the kit, falls back to prompts running alone and then the host drawing when a measure fails, and a later call starts at the fallback reached', () => {
    expect(kit).toBeDefined();
    // The device's tools as stand-ins: nvidia-smi's figures, and a Python whose torch answers its version.
    const stubs = path.join(dir, 'stubs');
    fs.mkdirSync(stubs);
    fs.writeFileSync(path.join(stubs, 'nvidia-smi'), '#!/bin/sh\ncase "$*" in *memory.total*noheader*) echo 81559 ;; *memory.used*noheader*) echo 1024 ;; *) echo "name, memory.total [MiB]"; echo "Stand-in GPU, 81559 MiB" ;; esac\n', { mode: 0o755 });
    fs.writeFileSync(path.join(stubs, 'python'), `#!/bin/sh\ncase "$*" in *"import torch"*) echo "python stand-in" ;; *) exec /usr/bin/python3 "$@" ;; esac\n`, { mode: 0o755 });
    const preset = `kit-test-${process.pid}`;
    const work = path.join('/tmp/axis-gpu', preset);
    fs.rmSync(work, { recursive: true, force: true });
    fs.mkdirSync(work, { recursive: true });
    fs.symlinkSync(path.join(dir, 'work', 'model'), path.join(work, 'model'));
    const out = path.join(dir, 'run-out');
    const runSh = (flags: string) =>
      spawnSync(path.join(ROOT, 'bench/gpu/run.sh'), [kit, preset, out, 'measure'], {
        encoding: 'utf8',
        env: { PATH: `${stubs}:${process.env.PATH}`, HOME: dir, AXIS_GPU_PYTHON: path.join(stubs, 'python'), AXIS_GPU_MEASURE_FLAGS: flags },
      });
    try {
      // CUDA on this CPU: every try fails, each with the next fallback's flags, and none is marked done.
      let r = runSh('');
      expect(r.status).not.toBe(0);
      const tries = r.stdout.split('\n').filter((l) => l.startsWith('== measure with '));
      expect(tries).toEqual(['== measure with the defaults of the engine', '== measure with --join off', '== measure with --join off --sample host']);
      expect(fs.readFileSync(path.join(work, 'measure-fallback'), 'utf8').trim()).toBe('3');
      expect(fs.existsSync(path.join(work, 'done-measure'))).toBe(false);

      // A later call starts at the fallback the last one reached (here the first), and its engine ran so.
      fs.writeFileSync(path.join(work, 'measure-fallback'), '1\n');
      r = runSh('--device cpu --items 6 --cap 12 --extract 2 --max-slots 2 --repeats 1');
      expect(r.stdout).toMatch(/^== measure with --join off$/m);
      expect(r.stdout).not.toMatch(/measure with the defaults/);
      expect(r.status).toBe(0);
      expect(fs.existsSync(path.join(work, 'done-measure'))).toBe(true);
      const e = JSON.parse(fs.readFileSync(path.join(out, 'engine.json'), 'utf8'));
      expect(e.join_prompts).toBe(false);
      expect(e.generate.runs.map((x: { prompts_joined: number; prompts_alone: number }) => [x.prompts_joined, x.prompts_alone])).toEqual([[0, 6]]);
      // The log lands in the output folder.
      expect(fs.readdirSync(out).some((n) => n.endsWith(`-${preset}.log`))).toBe(true);
    } finally {
      fs.rmSync(work, { recursive: true, force: true });
    }
  }, 300_000);

  test('the device scripts parse (bash -n, python3 -m py_compile)', () => {
    for (const f of ['pack.sh', 'unpack.sh', 'run.sh']) execFileSync('bash', ['-n', path.join(ROOT, 'bench/gpu', f)]);
    const out = path.join(tempDir('gpu-py'), 'c');
    for (const f of ['weights.py', 'hf.py']) execFileSync('python3', ['-c', `import py_compile; py_compile.compile(${JSON.stringify(path.join(ROOT, 'bench/gpu', f))}, cfile=${JSON.stringify(out)}, doraise=True)`]);
  });
});
