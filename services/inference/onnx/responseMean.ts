/** How a response token counts towards the activation. */
export type TokenKind = 'content' | 'whitespace' | 'marker';

/**
 * The per-layer mean of the hidden states over a response's content tokens, accumulated one
 * token at a time in float64 and never stored per token. Chat-template markers never count;
 * whitespace-only tokens count only between content tokens: leading ones are dropped, trailing
 * ones wait in `pending` and are dropped if no content follows.
 */
export class ResponseMean {
  private readonly sum: Float64Array;
  private readonly pending: Float64Array;
  private count = 0;
  private pendingCount = 0;
  private started = false;

  constructor(readonly numLayers: number, readonly hidden: number) {
    this.sum = new Float64Array(numLayers * hidden);
    this.pending = new Float64Array(numLayers * hidden);
  }

  get tokens(): number {
    return this.count;
  }

  /** `row(l)` gives the token's hidden state at layer l ([hidden]). */
  add(kind: TokenKind, row: (l: number) => ArrayLike<number>): void {
    if (kind === 'marker') return;
    if (kind === 'whitespace') {
      if (!this.started) return;
      this.addInto(this.pending, row);
      this.pendingCount++;
      return;
    }
    this.started = true;
    if (this.pendingCount) {
      for (let i = 0; i < this.sum.length; i++) this.sum[i] += this.pending[i];
      this.count += this.pendingCount;
      this.pending.fill(0);
      this.pendingCount = 0;
    }
    this.addInto(this.sum, row);
    this.count++;
  }

  /** The mean as float32 [numLayers, hidden]; zeros when no token counted (an empty answer). */
  mean(): Float32Array {
    const out = new Float32Array(this.sum.length);
    if (this.count) for (let i = 0; i < out.length; i++) out[i] = this.sum[i] / this.count;
    return out;
  }

  private addInto(target: Float64Array, row: (l: number) => ArrayLike<number>): void {
    const d = this.hidden;
    for (let l = 0; l < this.numLayers; l++) {
      const r = row(l);
      for (let i = 0; i < d; i++) target[l * d + i] += r[i];
    }
  }
}
