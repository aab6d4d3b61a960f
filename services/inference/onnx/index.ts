import type { ModelMetadata } from '../../contracts/modelDirectory';
import { DecoderSession } from './session';

/**
 * The ONNX engine's public entry point: what code outside the inference service (the tools
 * beside the CLI) may use. Everything else in this folder is the engine's own.
 */
export { OnnxBackend, parsePlacements } from './backend';
export type { OnnxOptions } from './backend';
export type { BatchStats } from './engine';
export { ModelLoadError } from './session';

/** One forward pass over token ids on the CPU: each decoder block's output and the logits at every position. */
export async function forwardPass(modelDir: string, ids: number[]): Promise<{ metadata: ModelMetadata; hidden: Float32Array[]; logits: Float32Array }> {
  const decoder = await DecoderSession.load(modelDir);
  try {
    const vocab = decoder.metadata.vocab_size;
    const bad = ids.find((id) => id >= vocab);
    if (bad !== undefined) throw new Error(`--ids: token id ${bad} is outside the vocabulary (size ${vocab})`);
    const { hidden, allLogits } = await decoder.forward(ids);
    return { metadata: decoder.metadata, hidden, logits: allLogits };
  } finally {
    await decoder.close();
  }
}
