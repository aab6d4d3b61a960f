import type { ModelMetadata } from '../../contracts/modelDirectory';
import { DecoderSession, readMetadata } from './session';
import { CappingConfig } from './steering';
import { StepSession } from './stepSession';

/**
 * The ONNX engine's public entry point: what code outside the inference service (the tools
 * beside the CLI) may use. Everything else in this folder is the engine's own.
 */
export { OnnxBackend, parsePlacements } from './backend';
export type { OnnxOptions } from './backend';
export type { BatchStats } from './engine';
export type { HostDraws, PrefillStats, SlotPolicy, StepStats } from './slotEngine';
export { SLOT_POLICIES } from './slotEngine';
export { ModelLoadError, parseCudaOptions } from './session';
export { CAPPING_FORMAT, CappingConfig, SteeringError } from './steering';
export type { CappingConfigFile, InterventionSpec, Steering } from './steering';
export { STEP_RUNTIMES } from './stepSession';
export type { StepRuntime } from './stepSession';

/**
 * One forward pass over token ids on the CPU: each decoder block's output and the logits at
 * every position. It runs the engine's step graph (what generation computes, in f32 or f16),
 * or for a bf16 build the portable graph (float32 arithmetic over the bf16 weights: bf16
 * tensors cannot pass through onnxruntime-node, and the CPU has no bf16 arithmetic); `graph`
 * says which.
 */
export async function forwardPass(modelDir: string, ids: number[], capping?: { config: string; experiment: string }): Promise<{ metadata: ModelMetadata; hidden: Float32Array[]; logits: Float32Array; graph: 'step' | 'portable' }> {
  const metadata = await readMetadata(modelDir);
  const vocab = metadata.vocab_size;
  const bad = ids.find((id) => id >= vocab);
  if (bad !== undefined) throw new Error(`--ids: token id ${bad} is outside the vocabulary (size ${vocab})`);
  const steer = capping ? CappingConfig.load(capping.config, { numLayers: metadata.num_layers, hidden: metadata.hidden_size }).experiment(capping.experiment) : undefined;
  if (metadata.step && metadata.step.compute_dtype !== 'bf16' && (metadata.layers?.[0] ?? 0) === 0) {
    const step = await StepSession.load(modelDir, { slots: 1, slotLength: ids.length });
    try {
      const { hidden, logits } = await step.prefill(0, ids, { logits: 'all', steer });
      return { metadata, hidden, logits, graph: 'step' };
    } finally {
      await step.close();
    }
  }
  if (capping) throw new Error(`--capping: the interventions are in the step graph, which ${metadata.step ? `computes in bf16 here (the CPU cannot run it): build with --dtype f32 to check them on the CPU` : 'this build lacks: build the model again'}`);
  const decoder = await DecoderSession.load(modelDir);
  try {
    const { hidden, allLogits } = await decoder.forward(ids);
    return { metadata, hidden, logits: allLogits, graph: 'portable' };
  } finally {
    await decoder.close();
  }
}
