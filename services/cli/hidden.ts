import { forwardPass } from '../inference/onnx';
import { writeSafetensors } from '../shared/safetensors';

/**
 * `axis-model hidden`: one forward pass over token ids; writes `hidden_states`
 * [num_layers, seq, hidden] (each decoder block's output) and `logits` [seq, vocab].
 * It lives with the tools because it needs both a built model and the inference engine.
 */
export async function writeHiddenStates(modelDir: string, ids: number[], out: string, capping?: { config: string; experiment: string }): Promise<'step' | 'portable'> {
  const { metadata, hidden, logits, graph } = await forwardPass(modelDir, ids, capping);
  const { num_layers: L, hidden_size: d, vocab_size: vocab } = metadata;
  const stacked = new Float32Array(L * ids.length * d);
  hidden.forEach((h, l) => stacked.set(h, l * ids.length * d));
  await writeSafetensors(out, { hidden_states: { shape: [L, ids.length, d], data: stacked }, logits: { shape: [ids.length, vocab], data: logits } }, { model: metadata.name, graph, ...(capping ? { capping: capping.config, experiment: capping.experiment } : {}) });
  return graph;
}
