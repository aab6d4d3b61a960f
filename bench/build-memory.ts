/**
 * `make bench-build`: peak memory of `axis-model build` on a random checkpoint of several GB,
 * against a baseline run side by side: a process that reads the same checkpoint into memory,
 * as a builder that is not streaming would. Both run as child processes that report their
 * peak RSS (getrusage). Prints `result:` lines; numbers go to docs/PERFORMANCE.md.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const ROOT = path.resolve(__dirname, '..', '..');
const CLI = path.join(ROOT, 'dist', 'services', 'model', 'cli.js');

/** A llama-shaped config of about 840M parameters: 3.4 GB in F32. */
const CONFIG = {
  _name_or_path: 'bench-llama-840m',
  architectures: ['LlamaForCausalLM'],
  model_type: 'llama',
  hidden_size: 2048,
  intermediate_size: 5504,
  num_hidden_layers: 16,
  num_attention_heads: 16,
  num_key_value_heads: 4,
  vocab_size: 32000,
  rms_norm_eps: 1e-5,
  rope_theta: 10000,
  tie_word_embeddings: false,
};

function shapes(): [string, number[]][] {
  const { hidden_size: D, intermediate_size: I, num_attention_heads: H, num_key_value_heads: KV, vocab_size: V } = CONFIG;
  const hd = D / H;
  const out: [string, number[]][] = [['model.embed_tokens.weight', [V, D]]];
  for (let l = 0; l < CONFIG.num_hidden_layers; l++) {
    const p = `model.layers.${l}`;
    out.push(
      [`${p}.input_layernorm.weight`, [D]],
      [`${p}.self_attn.q_proj.weight`, [H * hd, D]],
      [`${p}.self_attn.k_proj.weight`, [KV * hd, D]],
      [`${p}.self_attn.v_proj.weight`, [KV * hd, D]],
      [`${p}.self_attn.o_proj.weight`, [D, H * hd]],
      [`${p}.post_attention_layernorm.weight`, [D]],
      [`${p}.mlp.gate_proj.weight`, [I, D]],
      [`${p}.mlp.up_proj.weight`, [I, D]],
      [`${p}.mlp.down_proj.weight`, [D, I]],
    );
  }
  out.push(['model.norm.weight', [D]], ['lm_head.weight', [V, D]]);
  return out;
}

/** Writes the checkpoint tensor by tensor (this writer streams too), values tiled from a small random pool. */
function writeCheckpoint(dir: string): number {
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(CONFIG));
  const header: Record<string, unknown> = {};
  let offset = 0;
  for (const [name, shape] of shapes()) {
    const bytes = shape.reduce((a, b) => a * b, 1) * 4;
    header[name] = { dtype: 'F32', shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - ((8 + json.length) % 8)) % 8);
  const fd = fs.openSync(path.join(dir, 'model.safetensors'), 'w');
  const head = Buffer.alloc(8);
  head.writeBigUInt64LE(BigInt(json.length));
  fs.writeSync(fd, head);
  fs.writeSync(fd, json);
  const pool = new Float32Array(1 << 20);
  for (let i = 0; i < pool.length; i++) pool[i] = (Math.random() - 0.5) * 0.05;
  const poolBytes = Buffer.from(pool.buffer);
  for (let written = 0; written < offset; written += poolBytes.length) fs.writeSync(fd, poolBytes, 0, Math.min(poolBytes.length, offset - written));
  fs.closeSync(fd);
  return fs.statSync(path.join(dir, 'model.safetensors')).size;
}

/** Peak RSS (MiB) of a child process, read from its rusage as it exits. */
function measure(script: string, args: string[]): { rssMiB: number; seconds: number } {
  const started = Date.now();
  const wrapper = `process.on('exit', () => require('node:fs').writeSync(2, 'PEAK_KIB ' + process.resourceUsage().maxRSS + '\\n'));\n` +
    `process.argv = [process.argv[0], ${JSON.stringify(script)}, ...${JSON.stringify(args)}];\nrequire(${JSON.stringify(script)});`;
  const res = spawnSync(process.execPath, ['-e', wrapper], { encoding: 'utf8', maxBuffer: 1 << 24 });
  if (res.status !== 0) throw new Error(`${script} failed: ${res.stderr}`);
  const m = /PEAK_KIB (\d+)/.exec(res.stderr);
  if (!m) throw new Error(`no peak reported: ${res.stderr}`);
  return { rssMiB: Number(m[1]) / 1024, seconds: (Date.now() - started) / 1000 };
}

function main(): void {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'axis-bench-build-'));
  try {
    const checkpoint = path.join(dir, 'checkpoint');
    process.stderr.write('writing a random 840M-parameter llama checkpoint (F32)...\n');
    const size = writeCheckpoint(checkpoint) / 2 ** 20;
    process.stderr.write(`checkpoint: ${size.toFixed(0)} MiB\n`);

    const loader = path.join(dir, 'load-whole.js');
    // Node reads at most 2 GiB into one Buffer: hold the file as 256 MiB pieces, all at once.
    fs.writeFileSync(loader, `const fs = require('node:fs'); const fd = fs.openSync(process.argv[2], 'r'); const parts = []; for (;;) { const b = Buffer.allocUnsafe(256 * 2 ** 20); const n = fs.readSync(fd, b, 0, b.length, null); if (n === 0) break; parts.push(b.subarray(0, n)); } let s = 0; for (const p of parts) for (let i = 0; i < p.length; i += 4096) s += p[i]; console.log(parts.length, s);`);
    process.stderr.write('baseline: reading the whole checkpoint into memory...\n');
    const baseline = measure(loader, [path.join(checkpoint, 'model.safetensors')]);
    process.stderr.write('axis-model build...\n');
    const build = measure(CLI, ['build', '--hf', checkpoint, '--out', path.join(dir, 'model')]);
    const outSize = fs.statSync(path.join(dir, 'model', 'onnx', 'model.onnx_data')).size / 2 ** 20;

    process.stdout.write(`checkpoint ${size.toFixed(0)} MiB -> weights ${outSize.toFixed(0)} MiB in ${build.seconds.toFixed(1)} s\n`);
    process.stdout.write(`peak RSS: build ${build.rssMiB.toFixed(0)} MiB, baseline (whole checkpoint in memory) ${baseline.rssMiB.toFixed(0)} MiB\n`);
    process.stdout.write(`result: checkpoint_size = ${size.toFixed(0)} MiB\n`);
    process.stdout.write(`result: build_peak_rss = ${build.rssMiB.toFixed(0)} MiB\n`);
    process.stdout.write(`result: baseline_peak_rss = ${baseline.rssMiB.toFixed(0)} MiB\n`);
    process.stdout.write(`result: build_peak_rss_over_checkpoint = ${(build.rssMiB / size).toFixed(3)} ratio\n`);
    process.stdout.write(`result: build_peak_rss_over_baseline = ${(build.rssMiB / baseline.rssMiB).toFixed(3)} ratio\n`);
    process.stdout.write(`result: build_seconds = ${build.seconds.toFixed(1)} s\n`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main();
