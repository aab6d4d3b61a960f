import { DecoderBuilder } from './decoder';

/**
 * Gemma 2: embeddings scaled by sqrt(hidden); RMSNorm as x * (1 + w); norms before and after
 * both attention and MLP; scores scaled by query_pre_attn_scalar^-0.5 and soft-capped;
 * sliding-window attention on alternate layers; tanh-approximated GELU; soft-capped logits.
 */
export class Gemma2Builder extends DecoderBuilder {
  protected override async embed(inputIds: string): Promise<string> {
    // transformers multiplies by sqrt(hidden) rounded to the activations' dtype.
    return this.g.node('Mul', [await super.embed(inputIds), this.scalar(Math.sqrt(this.dims.hidden))]);
  }

  /** x * (1 + w), in float32 as Hugging Face computes it, then rounded to the activations' type. */
  protected override async norm(x: string, weightName: string, size = this.dims.hidden): Promise<string> {
    const g = this.g;
    return this.toAct(g.node('Mul', [this.normalize(this.toFloat(x)), g.node('Add', [await this.normWeight(weightName, size), g.constFloat([1], [])])]));
  }

  protected override async block(l: number, h: string): Promise<string> {
    const p = this.layerPrefix(l);
    const g = this.g;
    const attn = await this.attention(l, await this.norm(h, `${p}.input_layernorm.weight`));
    const h1 = g.node('Add', [h, await this.norm(attn, `${p}.post_attention_layernorm.weight`)]);
    const mlp = await this.mlp(l, await this.norm(h1, `${p}.pre_feedforward_layernorm.weight`));
    return g.node('Add', [h1, await this.norm(mlp, `${p}.post_feedforward_layernorm.weight`)]);
  }

  protected override attentionScale(): number {
    const scalar = this.config.query_pre_attn_scalar as number | undefined;
    return 1 / Math.sqrt(scalar ?? this.dims.headDim);
  }

  protected override attentionSoftcap(): number | undefined {
    return (this.config.attn_logit_softcapping as number | null | undefined) ?? undefined;
  }

  protected override slidingWindow(l: number): number | undefined {
    const window = this.config.sliding_window as number | null | undefined;
    return window && this.isSliding(l) ? window : undefined;
  }

  /** `layer_types` when the config lists them; otherwise even layers slide, as in transformers. */
  private isSliding(l: number): boolean {
    const types = this.config.layer_types as string[] | undefined;
    return types ? types[l] === 'sliding_attention' : l % 2 === 0;
  }

  protected override activation(x: string): string {
    // gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    const g = this.g;
    const cube = g.node('Mul', [g.node('Mul', [x, x]), x]);
    const inner = g.node('Mul', [g.node('Add', [x, g.node('Mul', [cube, this.scalar(0.044715)])]), this.scalar(Math.sqrt(2 / Math.PI))]);
    return g.node('Mul', [g.node('Mul', [x, this.scalar(0.5)]), g.node('Add', [g.node('Tanh', [inner]), this.scalar(1)])]);
  }

  protected override logitsTransform(logits: string): string {
    const cap = this.config.final_logit_softcapping as number | null | undefined;
    return cap ? this.softcap(logits, cap) : logits;
  }
}
