import { DecoderBuilder } from './decoder';

/** Llama: the shared decoder, plus Llama 3's rotary frequency scaling (`rope_scaling.rope_type: llama3`). */
export class LlamaBuilder extends DecoderBuilder {
  protected override inverseFrequencies(): Float32Array {
    const base = super.inverseFrequencies();
    const scaling = this.config.rope_scaling as { rope_type?: string; type?: string; factor: number; low_freq_factor: number; high_freq_factor: number; original_max_position_embeddings: number } | undefined;
    if (!scaling || (scaling.rope_type ?? scaling.type) !== 'llama3') return base;
    // As transformers' _compute_llama3_parameters: long wavelengths slowed by `factor`, short kept, a smooth blend between.
    const { factor, low_freq_factor: low, high_freq_factor: high, original_max_position_embeddings: original } = scaling;
    const lowWavelen = original / low;
    const highWavelen = original / high;
    return base.map((f) => {
      const wavelen = (2 * Math.PI) / f;
      if (wavelen < highWavelen) return f;
      if (wavelen > lowWavelen) return f / factor;
      const smooth = (original / wavelen - low) / (high - low);
      return (1 - smooth) * (f / factor) + smooth * f;
    });
  }
}
