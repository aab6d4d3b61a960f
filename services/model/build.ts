import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { MODEL_FILES, ModelMetadata, StepGraphMetadata, WeightDtype } from '../contracts/modelDirectory';
import { codeVersion } from '../shared/codeVersion';
import { exists } from '../shared/files';
import { builderFor } from './builders';
import { CheckpointReader, readConfig } from './checkpoint';
import { buildDecodeLoop } from './decodeLoop';
import { ExternalData, GraphBuilder, WrittenWeights } from './graph';

const COPIED = ['tokenizer.json', 'tokenizer_config.json', 'generation_config.json', 'special_tokens_map.json', 'chat_template.jinja'];

export interface BuildModelOptions {
  hf: string;
  out: string;
  capture: boolean;
  dtype?: WeightDtype;
  layers?: [number, number];
  /** Also write the generation graph (whole models only); default true. */
  decodeLoop?: boolean;
  /**
   * How many of each row's most probable ids the step graph gives a host that samples
   * (default STEP_CANDIDATES; 0: none, the host then samples from the logits alone).
   */
  candidates?: number;
  /** As the checkpoint is read: bytes of its tensors read so far, and in all (a stage reads only its own). */
  progress?: (bytesRead: number, totalBytes: number) => void;
}

/**
 * The step graph's candidates per row: the nucleus of a trained model's next token (top_p 0.9)
 * is a few to a few hundred ids, and even a random-weight model's (its logits nearly flat) is
 * under 1,024 nearly always (measured on the benchmark model: median 596, at most 1,052 of
 * 32,005); a TopK of 1,024 over 32k ids costs about a quarter of the host's full pass.
 */
export const STEP_CANDIDATES = 1024;

/**
 * Builds a model directory from a Hugging Face checkpoint: the ONNX decoder graph with its
 * weights as external data, the tokenizer and generation files, and the metadata. Everything
 * is written into a temporary directory beside `out` and renamed at the end, so `out` is
 * either complete or absent. Weights stream tensor by tensor from checkpoint to data file.
 */
export async function buildModel(opts: BuildModelOptions, log: (msg: string) => void = () => undefined): Promise<ModelMetadata> {
  if (await exists(opts.out)) throw new Error(`--out: ${opts.out} already exists; remove it or choose another directory`);
  const config = await readConfig(opts.hf);
  // Gemma 2's activations exceed float16's range (Hugging Face runs it in bf16 or float32).
  if (config.model_type === 'gemma2' && opts.dtype === 'f16') throw new Error('--dtype f16: Gemma 2 overflows in float16; build it with --dtype bf16');
  const ckpt = await CheckpointReader.open(opts.hf);
  ckpt.onProgress = opts.progress;
  const tmp = `${opts.out.replace(/\/+$/, '')}.building-${randomBytes(4).toString('hex')}`;
  await fs.mkdir(path.join(tmp, 'onnx'), { recursive: true });
  let data: ExternalData | undefined;
  let closed = false;
  try {
    data = await ExternalData.create(path.join(tmp, MODEL_FILES.weights), path.basename(MODEL_FILES.weights));
    const dtype = opts.dtype ?? 'f32';
    const g = new GraphBuilder(data, dtype);
    const builder = builderFor(config, ckpt, g);
    log(`building ${config.model_type}: ${builder.dims.numLayers} layers${opts.layers ? ` (stage ${opts.layers[0]}:${opts.layers[1]})` : ''}, hidden ${builder.dims.hidden}, vocab ${builder.dims.vocab}, weights ${dtype}`);
    const signature = await builder.build({ capture: opts.capture, layers: opts.layers });
    const weightsSha = await data.close();
    closed = true;
    const graphBytes = g.encode(`${config.model_type}-decoder`, 'assistant-axis');
    await fs.writeFile(path.join(tmp, MODEL_FILES.graph), graphBytes);
    // The step graph: the same weights, used as stored (no cast), GroupQueryAttention over fixed KV buffers.
    const stepGraph = new GraphBuilder(new WrittenWeights(data), dtype, undefined, false);
    const stepSignature = await builderFor(config, ckpt, stepGraph, { kind: 'step' }).build({ capture: opts.capture, layers: opts.layers, steering: true, candidates: opts.candidates ?? STEP_CANDIDATES, join: true });
    const stepBytes = stepGraph.encode(`${config.model_type}-step`, 'assistant-axis');
    await fs.writeFile(path.join(tmp, MODEL_FILES.step), stepBytes);
    const step: StepGraphMetadata = {
      graph: MODEL_FILES.step,
      inputs: stepSignature.inputs,
      outputs: stepSignature.outputs,
      hidden_state_outputs: stepSignature.hiddenStateOutputs,
      compute_dtype: dtype,
      graph_sha256: sha256(stepBytes),
      ...(stepSignature.responseSums ? { response_sums: true } : {}),
      ...(stepSignature.sampling ? { sampling: true } : {}),
      ...(stepSignature.steering ? { steering: true } : {}),
      ...(stepSignature.candidates ? { candidates: stepSignature.candidates } : {}),
      ...(stepSignature.sampling ? { empty_logits_positions: true } : {}),
      ...(stepSignature.sampling && stepSignature.candidates ? { partial_sort_sampling: true } : {}),
      ...(stepSignature.join ? { join: true } : {}),
    };
    log(`wrote the step graph ${MODEL_FILES.step} (computing in ${dtype})`);
    let decodeLoop: ModelMetadata['decode_loop'];
    const whole = signature.layers[0] === 0 && signature.layers[1] === builder.dims.numLayers;
    if ((opts.decodeLoop ?? true) && whole) {
      const loop = new GraphBuilder(new WrittenWeights(data), dtype);
      const loopSignature = await buildDecodeLoop(config, ckpt, loop, opts.capture);
      const loopBytes = loop.encode(`${config.model_type}-generate`, 'assistant-axis');
      await fs.writeFile(path.join(tmp, MODEL_FILES.decodeLoop), loopBytes);
      decodeLoop = { graph: MODEL_FILES.decodeLoop, ...loopSignature, graph_sha256: sha256(loopBytes) };
      log(`wrote the generation graph ${MODEL_FILES.decodeLoop}`);
    }

    const configRaw = await fs.readFile(path.join(opts.hf, 'config.json'), 'utf8');
    const hfConfig = JSON.parse(configRaw);
    // transformers.js loads onnx/model.onnx with its weights from onnx/model.onnx_data when told so.
    hfConfig['transformers.js_config'] = { ...(hfConfig['transformers.js_config'] ?? {}), use_external_data_format: { 'model.onnx': true } };
    await fs.writeFile(path.join(tmp, 'config.json'), JSON.stringify(hfConfig, null, 2) + '\n');
    for (const f of COPIED) if (await exists(path.join(opts.hf, f))) await fs.copyFile(path.join(opts.hf, f), path.join(tmp, f));

    const d = builder.dims;
    const metadata: ModelMetadata = {
      format: 'assistant-axis-model/1',
      name: typeof config._name_or_path === 'string' && config._name_or_path ? config._name_or_path : path.basename(path.resolve(opts.hf)),
      architecture: config.model_type,
      num_layers: d.numLayers,
      hidden_size: d.hidden,
      num_attention_heads: d.heads,
      num_key_value_heads: d.kvHeads,
      head_dim: d.headDim,
      vocab_size: d.vocab,
      dtype,
      layers: signature.layers,
      graph: MODEL_FILES.graph,
      weights: MODEL_FILES.weights,
      inputs: signature.inputs,
      outputs: signature.outputs,
      hidden_state_outputs: signature.hiddenStateOutputs,
      ...(decodeLoop ? { decode_loop: decodeLoop } : {}),
      step,
      hashes: { graph_sha256: sha256(graphBytes), weights_sha256: weightsSha, config_sha256: sha256(configRaw) },
      built_with: codeVersion(),
    };
    await fs.writeFile(path.join(tmp, MODEL_FILES.metadata), JSON.stringify(metadata, null, 2) + '\n');
    await fs.rename(tmp, opts.out);
    return metadata;
  } catch (err) {
    if (data && !closed) await data.abort();
    await fs.rm(tmp, { recursive: true, force: true });
    throw err;
  }
}

function sha256(data: string | Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}
