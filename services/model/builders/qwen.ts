import { DecoderBuilder } from './decoder';

/** Qwen 2 / 2.5: the shared decoder with biases on the q, k and v projections. */
export class Qwen2Builder extends DecoderBuilder {
  protected override hasQkvBias(): boolean {
    return true;
  }
}

/** Qwen 3: no q/k/v biases; an RMSNorm over head_dim on each query and key head before rotary. */
export class Qwen3Builder extends DecoderBuilder {
  protected override async queryKeyNorm(l: number, q: string, k: string): Promise<[string, string]> {
    const p = `${this.layerPrefix(l)}.self_attn`;
    const hd = this.dims.headDim;
    return [await this.norm(q, `${p}.q_norm.weight`, hd), await this.norm(k, `${p}.k_norm.weight`, hd)];
  }
}
