import { ResponseCount } from './responseMean';
import type { BatchRunner, SequenceJob, SequenceResult, TokenRules } from './runner';
import type { Placement } from './session';
import { drawToken } from './sampling';
import { Join, Sampling, SlotError, StepResult, StepSession } from './stepSession';

/**
 * Which waiting item takes a free slot (`--slot-policy`): `fifo`, the oldest first, whoever
 * sent it; `chat-first`, chat items before run items, with `chatSlots` slots that run items never
 * take (a long run cannot starve people) and chat items taking more only while no run item waits
 * (a burst of chat cannot stall a run).
 */
export const SLOT_POLICIES = ['fifo', 'chat-first'] as const;
export type SlotPolicy = (typeof SLOT_POLICIES)[number];

export interface SlotEngineOptions {
  /** Prompt tokens per prefill run (longer prompts go in chunks). */
  prefillChunk: number;
  policy: SlotPolicy;
  /**
   * Static batching, the benchmark's baseline: new items are admitted only once every slot is
   * free, and the batch's rows all run until its longest item ends (finished rows idle in place).
   */
  staticBatches?: boolean;
  /**
   * Whether a prompt starts from the keys and values of a prompt that began the same way, where
   * some slot still holds them (`StepSession.reusePrefix`; default on). Off, every prompt is
   * prefilled from its first token.
   */
  prefixReuse?: boolean;
  /** `chat-first`: slots kept for chat items (at most the slots less one). */
  chatSlots?: number;
  /**
   * Whether a waiting item's prompt runs in the same run as the next decoding step (one item a
   * step, where the model's step graph takes a joining row: StepGraphMetadata.join) instead of
   * a run of its own: the weights are read once for both (default on). Extract items and the
   * first batch (nothing decoding yet) have runs of their own.
   */
  joinPrompts?: boolean;
}

export type Lane = 'run' | 'chat';

/** One item's prefill, for the metrics: its prompt's tokens and how many of them were reused. */
export interface PrefillStats {
  tokens: number;
  reused: number;
  /** Its first token's draw on the host (none: an Extract, or drawn by the graph). */
  drawn?: HostDraws;
  /** Its prompt ran in a decoding step's run (its last chunk, for a long one). */
  joined?: boolean;
}

/**
 * Tokens drawn on the host: from the graph's candidates, or from the whole vocabulary's logits
 * (greedy rows, top_p 1, a nucleus that goes past the candidates, a graph without them).
 */
export interface HostDraws {
  candidates: number;
  vocabulary: number;
}

/** One decoding step, for the metrics. */
export interface StepStats {
  /** Slots decoding in this step. */
  active: number;
  /** Rows the step ran: the busy slots (gaps are closed first); in static batching, the whole batch. */
  rows: number;
  seconds: number;
  /** Its tokens drawn on the host (all zeros when the graph draws). */
  drawn: HostDraws;
}

export class CancelledError extends Error {
  readonly code = 1; // grpc.status.CANCELLED
}

interface Item {
  job: SequenceJob;
  /** Who sent it: a run's item, or a chat request (what `chat-first` tells apart). */
  lane: Lane;
  extract: boolean;
  resolve: (r: SequenceResult) => void;
  reject: (e: unknown) => void;
  signal?: AbortSignal;
}

/** A generating item in its slot: what it sampled, the token it feeds next, which of its tokens count (the sums are in the slot). */
interface Busy {
  item: Item;
  responseIds: number[];
  next: number;
  count: ResponseCount;
}

/**
 * Continuous batching over the step graph's slots. An item is prefilled into a free slot (a
 * batch-1 run, in chunks) and from the next step decodes with the others, one token per step;
 * when it ends (a stop token, its token budget, cancellation) its slot is free at once for
 * the next waiting item. Each slot keeps its item's own sampling parameters and uniforms, so
 * an item's text does not depend on its slot, its neighbours or the step it joined at; the
 * per-layer sums over the response's counted tokens (docs/CONCEPTS.md, "Activation") grow in
 * the slot, inside the step graph, and only the finished item's sums leave it. Extract items
 * use a slot for their prefill only.
 */
export class SlotEngine {
  private readonly queue: Item[] = [];
  private readonly slots: (Busy | undefined)[];
  private pumping = false;
  private closed = false;
  /** Static batching: the rows of the batch in flight. */
  private batchRows = 0;

  constructor(
    private readonly step: StepSession,
    private readonly rules: TokenRules,
    private readonly opts: SlotEngineOptions,
    private readonly onStep: (s: StepStats) => void = () => undefined,
    private readonly onPrefill: (p: PrefillStats) => void = () => undefined,
  ) {
    this.slots = new Array(step.slots).fill(undefined);
  }

  /** Items waiting for a slot. */
  get waiting(): number {
    return this.queue.length;
  }

  /** Slots holding an item now. */
  get occupied(): number {
    return this.slots.filter(Boolean).length;
  }

  /** For the batch-size gauge: the slots decoding now. */
  get currentBatch(): number {
    return this.occupied;
  }

  submit(job: SequenceJob, extract: boolean, signal?: AbortSignal, lane: Lane = 'run'): Promise<SequenceResult> {
    if (this.closed) return Promise.reject(new Error('the engine is closed'));
    if (signal?.aborted) return Promise.reject(new CancelledError('cancelled before it started'));
    return new Promise((resolve, reject) => {
      // One stream's signal serves all its items: each item's listener leaves with the item.
      const onAbort = () => this.cancelWaiting(item);
      const done = () => signal?.removeEventListener('abort', onAbort);
      const item: Item = { job, extract, lane, resolve: (r) => (done(), resolve(r)), reject: (e) => (done(), reject(e)), signal };
      this.queue.push(item);
      signal?.addEventListener('abort', onAbort, { once: true });
      void this.pump();
    });
  }

  /** Fails what still waits; items in slots finish. */
  close(): void {
    this.closed = true;
    for (const w of this.queue.splice(0)) w.reject(new Error('the inference service is shutting down'));
  }

  private cancelWaiting(item: Item): void {
    const at = this.queue.indexOf(item);
    if (at >= 0) {
      this.queue.splice(at, 1);
      item.reject(new CancelledError('cancelled while waiting for a slot'));
    }
    // An item in a slot is let go at the next step boundary (a run cannot be interrupted).
  }

  /** Runs admissions and steps while there is work; one pump at a time. */
  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    try {
      for (;;) {
        this.releaseCancelled();
        const joining = await this.admit();
        await this.closeGaps();
        if (!this.slots.some(Boolean)) {
          // Nothing decodes for it to join: a run of its own.
          if (joining) await this.admitAlone(this.slots.findIndex((b) => !b), joining);
          if (this.queue.length === 0 && !this.slots.some(Boolean)) return;
          continue;
        }
        await this.decodeStep(joining);
      }
    } finally {
      this.pumping = false;
    }
  }

  /**
   * Prefills waiting items into free slots, lowest first (so a step's rows stay few). While
   * slots decode (continuous batching), the first item that can join the next step is returned
   * instead (it takes a free slot there), and the items after it wait for the steps after.
   */
  private async admit(): Promise<Item | undefined> {
    if (this.opts.staticBatches) {
      if (this.slots.some(Boolean)) return undefined;
      this.batchRows = Math.min(this.queue.length, this.slots.length);
    }
    const joins = this.opts.joinPrompts !== false && !this.opts.staticBatches && this.step.step.join === true && this.slots.some(Boolean);
    let joining: Item | undefined;
    for (let s = 0; s < this.slots.length && this.queue.length > 0; s++) {
      if (this.slots[s]) continue;
      const at = this.next(joining);
      if (at < 0) break;
      const waiting = this.queue[at];
      if (joins && !waiting.extract && waiting.job.maxNew > 0) {
        // One joining prompt a step; this free slot is left for it.
        if (joining) break;
        joining = this.queue.splice(at, 1)[0];
        continue;
      }
      await this.admitAlone(s, this.queue.splice(at, 1)[0]);
    }
    return joining;
  }

  /** An item's prompt in a run of its own into free slot `slot`. */
  private async admitAlone(slot: number, item: Item): Promise<void> {
    try {
      await this.prefill(slot, item);
    } catch (err) {
      // A failing item fails alone; its slot is free again.
      this.step.reset(slot);
      this.slots[slot] = undefined;
      item.reject(err);
    }
  }

  /** The waiting item that takes the next free slot (its index in the queue), or -1 for none; `joining` will take a slot too. */
  private next(joining?: Item): number {
    if (this.opts.policy !== 'chat-first') return 0;
    const reserved = Math.min(this.opts.chatSlots ?? 0, this.slots.length - 1);
    const busy = (lane: Lane) => this.slots.filter((b) => b?.item.lane === lane).length + (joining?.lane === lane ? 1 : 0);
    const chat = this.queue.findIndex((w) => w.lane === 'chat');
    const run = this.queue.findIndex((w) => w.lane === 'run');
    if (chat >= 0 && (run < 0 || busy('chat') < reserved)) return chat;
    if (run >= 0 && busy('run') < this.slots.length - reserved) return run;
    return -1;
  }

  private async prefill(slot: number, item: Item): Promise<void> {
    const { job } = item;
    this.checkFits(job);
    this.step.reset(slot);
    const extract = item.extract || job.maxNew === 0;
    // At least the last prompt token is run (its logits draw the first token, and the run
    // starts the slot's sums afresh); an Extract item's weighted positions are all run.
    const firstWeighted = extract && job.weights ? job.weights.findIndex((w) => w !== 0) : -1;
    const limit = Math.min(job.ids.length - 1, firstWeighted >= 0 ? firstWeighted : Infinity);
    const reused = this.opts.prefixReuse === false ? 0 : await this.step.reusePrefix(slot, job.ids, limit, job.steering?.id);
    // The slot's sums start afresh; an Extract item's answer positions are weighted in this prefill.
    const out = await this.step.prefill(slot, job.ids.slice(reused), {
      chunk: this.opts.prefillChunk,
      hidden: false,
      fresh: true,
      weights: extract ? job.weights?.subarray(reused) : undefined,
      logits: extract || this.step.sampleInGraph ? 'none' : 'last',
      sample: extract ? undefined : this.firstDraw(job),
      candidates: !extract && this.step.hostCandidates,
      steer: job.steering,
    });
    const { num_layers: L, hidden_size: d } = this.step.metadata;
    if (extract) {
      this.onPrefill({ tokens: job.ids.length, reused });
      // Extract: the weighted mean of the answer positions, from this prefill alone.
      const total = this.step.keepsSums ? Array.from(job.weights ?? [], Number).reduce((t, w) => t + (w || 0), 0) : 0;
      const mean = total ? await this.meanOf(slot, total) : new Float32Array(L * d);
      this.step.reset(slot);
      item.resolve({ responseIds: [], stopped: false, mean, counted: total });
      return;
    }
    this.start(slot, item, out, 0, reused, false);
  }

  /** The parameters the run that ends a prompt draws its first token with (in the graph, or here from its candidates), or none (drawn here from its logits). */
  private firstDraw(job: SequenceJob): Sampling | undefined {
    return this.step.sampleInGraph || this.step.hostCandidates ? { temperature: job.temperature, topP: job.topP, uniform: job.uniforms[0] } : undefined;
  }

  private checkFits(job: SequenceJob): void {
    const needs = job.ids.length + job.maxNew;
    if (needs > this.step.slotLength) throw new SlotError(`the item needs ${needs} tokens (${job.ids.length} of prompt, up to ${job.maxNew} new), more than a slot holds (${this.step.slotLength})`);
  }

  /**
   * Readies a joining item's slot, the first free one after the step's `rows`: the prefix it
   * reuses, and the chunks of a long prompt before its last in runs of their own. Undefined
   * (the item failed alone) when it cannot run.
   */
  private async prepareJoin(item: Item, rows: number): Promise<{ join: Join; reused: number } | undefined> {
    const { job } = item;
    const slot = this.slots.findIndex((b, s) => !b && s >= rows);
    try {
      if (item.signal?.aborted) throw new CancelledError('cancelled while waiting for a slot');
      // The admission left a slot free for it, and the busy ones were moved below it.
      if (slot < 0) throw new SlotError('no free slot after the decoding ones for a joining prompt');
      this.checkFits(job);
      this.step.reset(slot);
      const reused = this.opts.prefixReuse === false ? 0 : await this.step.reusePrefix(slot, job.ids, job.ids.length - 1, job.steering?.id);
      let ids = job.ids.slice(reused);
      let fresh = true;
      const chunk = this.opts.prefillChunk;
      if (ids.length > chunk) {
        await this.step.prefill(slot, ids.slice(0, ids.length - chunk), { chunk, hidden: false, fresh: true, logits: 'none', steer: job.steering });
        ids = ids.slice(ids.length - chunk);
        fresh = false;
      }
      return { join: { slot, ids, fresh, sample: this.firstDraw(job), steer: job.steering }, reused };
    } catch (err) {
      if (slot >= 0) this.step.reset(slot);
      item.reject(err);
      return undefined;
    }
  }

  /** An item whose prompt has run into `slot`: its first token, drawn from row `row` of `out`; the slot decodes it next unless it ends there. */
  private start(slot: number, item: Item, out: StepResult, row: number, reused: number, joined: boolean): void {
    const { job } = item;
    const { num_layers: L, hidden_size: d } = this.step.metadata;
    const drawn: HostDraws = { candidates: 0, vocabulary: 0 };
    const first = this.step.sampleInGraph ? Number(out.tokens![row]) : this.draw(out, row, job, 0, drawn);
    this.onPrefill({ tokens: job.ids.length, reused, ...(this.step.sampleInGraph ? {} : { drawn }), ...(joined ? { joined } : {}) });
    if (this.rules.stopIds.has(first)) {
      this.step.reset(slot);
      item.resolve({ responseIds: [], stopped: true, mean: new Float32Array(L * d), counted: 0 });
      return;
    }
    if (job.onToken?.(first) === true) {
      this.step.reset(slot);
      item.resolve({ responseIds: [first], stopped: true, mean: new Float32Array(L * d), counted: 0 });
      return;
    }
    this.slots[slot] = { item, responseIds: [first], next: first, count: new ResponseCount() };
  }

  /** A slot's running sum over `count` tokens, as a float32 mean [layers * hidden]. */
  private async meanOf(slot: number, count: number): Promise<Float32Array> {
    const sum = await this.step.readSum(slot);
    for (let i = 0; i < sum.length; i++) sum[i] /= count;
    return sum;
  }

  /**
   * Moves the highest busy items down into free slots below them, so that a step runs only
   * busy rows (a step costs its rows on a CPU). Free slots are filled by admission first, so
   * this acts once nothing waits: in the tail of a run. Not in static batching, whose rows
   * stay in place.
   */
  private async closeGaps(): Promise<void> {
    if (this.opts.staticBatches) return;
    for (;;) {
      const free = this.slots.findIndex((b) => !b);
      const top = this.slots.reduce((t, b, s) => (b ? s : t), -1);
      if (free < 0 || free > top) return;
      await this.step.move(top, free);
      this.slots[free] = this.slots[top];
      this.slots[top] = undefined;
    }
  }

  /**
   * One decoding step of the busy slots: feed each its next token (counted into its sums in the
   * step), sample the one after; `joining`'s prompt runs in the same run, into a free slot after
   * theirs, and its first token is drawn with theirs.
   */
  private async decodeStep(joining?: Item): Promise<void> {
    const rows = Math.max(this.opts.staticBatches ? this.batchRows : 0, this.slots.reduce((top, b, s) => (b ? s + 1 : top), 0));
    const joined = joining && (await this.prepareJoin(joining, rows));
    const stepped = this.slots.slice(0, rows);
    const tokens = stepped.map((b) => b?.next);
    const counts = stepped.map((b) => b?.count.add(this.rules.tokenKind(b.next)));
    // Each row's next token is drawn with its item's own parameters and n-th uniform: in the graph, or here (from the graph's candidates, else the logits).
    const inGraph = this.step.sampleInGraph;
    const candidates = this.step.hostCandidates;
    const sample = inGraph || candidates ? stepped.map((b) => b && { temperature: b.item.job.temperature, topP: b.item.job.topP, uniform: b.item.job.uniforms[b.responseIds.length] ?? 0 }) : undefined;
    const started = performance.now();
    let out;
    try {
      out = await this.step.decode(tokens, { counts, sample, candidates, hidden: false, logits: !inGraph, steer: stepped.map((b) => b?.item.job.steering), join: joined?.join });
    } catch (err) {
      if (joined) {
        this.step.reset(joined.join.slot);
        joining!.reject(err);
      }
      // The step failed for every row: the items in it fail, the slots are free again.
      this.slots.forEach((b, s) => {
        if (!b) return;
        this.step.reset(s);
        this.slots[s] = undefined;
        b.item.reject(err);
      });
      return;
    }
    let active = 0;
    const drawn: HostDraws = { candidates: 0, vocabulary: 0 };
    const finished: [number, boolean][] = [];
    this.slots.forEach((b, s) => {
      if (!b) return;
      active++;
      const { job } = b.item;
      if (b.responseIds.length >= job.maxNew) return finished.push([s, false]);
      const token = inGraph ? Number(out.tokens![s]) : this.draw(out, s, job, b.responseIds.length, drawn);
      if (this.rules.stopIds.has(token)) return finished.push([s, true]);
      b.responseIds.push(token);
      b.next = token;
      if (b.item.job.onToken?.(token) === true) finished.push([s, true]);
    });
    this.onStep({ active, rows, seconds: (performance.now() - started) / 1000, drawn });
    // The joining item's first token: the row after the step's.
    if (joined) this.start(joined.join.slot, joining!, out, rows, joined.reused, true);
    for (const [s, stopped] of finished) await this.finish(s, stopped);
  }

  /** Row `row`'s token drawn on the host, its item's n-th: among the graph's candidates where they hold the nucleus, else from the logits (counted in `tally`). */
  private draw(out: StepResult, row: number, job: SequenceJob, n: number, tally: HostDraws): number {
    const V = this.step.metadata.vocab_size;
    const { token, fromCandidates } = drawToken(out.logits.subarray(row * V, (row + 1) * V), out.candidates, row, job.temperature, job.topP, job.uniforms[n]);
    tally[fromCandidates ? 'candidates' : 'vocabulary']++;
    return token;
  }

  /** Reads a finished item's sums (before its slot can be reused) and frees the slot. */
  private async finish(slot: number, stopped: boolean): Promise<void> {
    const b = this.slots[slot]!;
    const counted = this.step.keepsSums ? b.count.tokens : 0;
    let mean: Float32Array;
    try {
      mean = counted ? await this.meanOf(slot, counted) : new Float32Array(this.step.metadata.num_layers * this.step.metadata.hidden_size);
    } catch (err) {
      this.slots[slot] = undefined;
      this.step.reset(slot);
      return b.item.reject(err);
    }
    this.slots[slot] = undefined;
    this.step.reset(slot);
    b.item.resolve({ responseIds: b.responseIds, stopped, mean, counted });
  }

  /** Lets go of items cancelled while in a slot: the slot is free for the next waiting item. */
  private releaseCancelled(): void {
    this.slots.forEach((b, s) => {
      if (!b?.item.signal?.aborted) return;
      this.slots[s] = undefined;
      this.step.reset(s);
      b.item.reject(new CancelledError('cancelled while generating'));
    });
  }
}

/**
 * The slots as a batch runner (what tools and tests that run jobs in batches use): each job
 * goes through the engine, so a batch is simply items submitted together.
 */
export class SlotRunner implements BatchRunner {
  readonly kind = 'slots';

  constructor(readonly step: StepSession, readonly engine: SlotEngine, readonly placements: Placement[]) {}

  run(jobs: SequenceJob[]): Promise<SequenceResult[]> {
    return Promise.all(jobs.map((j) => this.engine.submit(j, j.maxNew === 0)));
  }

  async close(): Promise<void> {
    this.engine.close();
    await this.step.close();
  }
}
