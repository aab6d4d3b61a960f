import { writeSafetensors } from '../shared/safetensors';
import { DecoderSession } from '../inference/onnx/session';

/**
 * `axis-model hidden`: one forward pass over token ids; writes `hidden_states`
 * [num_layers, seq, hidden] (each decoder block's output) and `logits` [seq, vocab].
 */
export async function writeHiddenStates(modelDir: string, ids: number[], out: string): Promise<void> {
  const decoder = await DecoderSession.load(modelDir);
  try {
    const vocab = decoder.metadata.vocab_size;
    const bad = ids.find((id) => id >= vocab);
    if (bad !== undefined) throw new Error(`--ids: token id ${bad} is outside the vocabulary (size ${vocab})`);
    const { hidden, allLogits } = await decoder.forward(ids);
    const { num_layers: L, hidden_size: d } = decoder.metadata;
    const stacked = new Float32Array(L * ids.length * d);
    hidden.forEach((h, l) => stacked.set(h, l * ids.length * d));
    await writeSafetensors(out, { hidden_states: { shape: [L, ids.length, d], data: stacked }, logits: { shape: [ids.length, vocab], data: allLogits } }, { model: decoder.metadata.name });
  } finally {
    await decoder.close();
  }
}
