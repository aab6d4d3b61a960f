/** How a response token counts towards the activation. */
export type TokenKind = 'content' | 'whitespace' | 'marker';

/**
 * What one response token does to the running sums: its hidden state's weight in the sum and
 * in the waiting sum, and whether the waiting sum joins the sum first (the step graph's
 * `response_weights` and `sums_mix`).
 */
export interface TokenWeights {
  sum: number;
  pending: number;
  flush: boolean;
}

const UNCOUNTED: TokenWeights = { sum: 0, pending: 0, flush: false };

/**
 * Which response tokens count towards the activation, one token at a time, and how many did.
 * Chat-template markers never count; whitespace-only tokens count only between content tokens:
 * leading ones are dropped, trailing ones wait and are dropped if no content follows. The
 * sums themselves are kept elsewhere (in the step graph, or in `ResponseMean`).
 */
export class ResponseCount {
  private count = 0;
  private pendingCount = 0;
  private started = false;

  get tokens(): number {
    return this.count;
  }

  add(kind: TokenKind): TokenWeights {
    if (kind === 'marker') return UNCOUNTED;
    if (kind === 'whitespace') {
      if (!this.started) return UNCOUNTED;
      this.pendingCount++;
      return { sum: 0, pending: 1, flush: false };
    }
    this.started = true;
    this.count += this.pendingCount + 1;
    this.pendingCount = 0;
    return { sum: 1, pending: 0, flush: true };
  }
}

/**
 * The per-layer mean of the hidden states over a response's counted tokens (`ResponseCount`),
 * accumulated one token at a time in float64 and never stored per token (the runners that
 * read hidden states on the host; the slot engine keeps its sums in the step graph).
 */
export class ResponseMean {
  private readonly sum: Float64Array;
  private readonly pending: Float64Array;
  private readonly counter = new ResponseCount();

  constructor(readonly numLayers: number, readonly hidden: number) {
    this.sum = new Float64Array(numLayers * hidden);
    this.pending = new Float64Array(numLayers * hidden);
  }

  get tokens(): number {
    return this.counter.tokens;
  }

  /** `row(l)` gives the token's hidden state at layer l ([hidden]). */
  add(kind: TokenKind, row: (l: number) => ArrayLike<number>): void {
    const w = this.counter.add(kind);
    if (w.flush) {
      for (let i = 0; i < this.sum.length; i++) this.sum[i] += this.pending[i];
      this.pending.fill(0);
    }
    if (w.sum) this.addInto(this.sum, row);
    if (w.pending) this.addInto(this.pending, row);
  }

  /** The mean as float32 [numLayers, hidden]; zeros when no token counted (an empty answer). */
  mean(): Float32Array {
    const out = new Float32Array(this.sum.length);
    const count = this.counter.tokens;
    if (count) for (let i = 0; i < out.length; i++) out[i] = this.sum[i] / count;
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
