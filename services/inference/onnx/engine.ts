import type { BatchRunner, SequenceJob, SequenceResult } from './runner';

export interface EngineOptions {
  /** Most sequences in one batch. */
  maxBatch: number;
  /** Most padded prompt tokens in one batch (batch size x longest prompt), which bounds the prefill's memory. */
  maxBatchTokens: number;
  /** How long an idle engine waits for a batch to fill before it starts a smaller one. */
  gatherMs: number;
}

/** What the backend submits items to: batches (BatchEngine) or slots (SlotEngine). */
export interface SequenceEngine {
  /** `signal`: the item may be dropped once aborted (the slots engine does; a batch runs to its end). */
  /** `lane`: who asks (a run's item or a chat request), for an engine whose policy tells them apart. */
  submit(job: SequenceJob, extract: boolean, signal?: AbortSignal, lane?: 'run' | 'chat'): Promise<SequenceResult>;
  /** Sequences running now (0 when idle), for the batch-size gauge. */
  readonly currentBatch: number;
  /** Items waiting to start. */
  readonly waiting: number;
  close(): void;
}

export interface BatchStats {
  size: number;
  paddedTokens: number;
  seconds: number;
}

interface Waiting {
  job: SequenceJob;
  /** Jobs of one kind share batches: generation with generation, extraction with extraction. */
  extract: boolean;
  arrived: number;
  resolve: (r: SequenceResult) => void;
  reject: (e: unknown) => void;
}

/**
 * Gathers sequences into batches and runs them one batch at a time. A batch starts from the
 * oldest waiting sequence and takes the others of its kind whose prompts are closest in
 * length, so padding stays small and nothing waits behind newer work for long. The generation
 * graph runs a batch to its end, so new sequences join the next batch, not a running one.
 */
export class BatchEngine implements SequenceEngine {
  private readonly queue: Waiting[] = [];
  private running = false;
  private closed = false;
  private timer: NodeJS.Timeout | undefined;
  /** The batch being run now (0 when idle), for the batch-size gauge. */
  currentBatch = 0;

  constructor(private readonly runner: BatchRunner, private readonly opts: EngineOptions, private readonly onBatch: (s: BatchStats) => void = () => undefined) {}

  get waiting(): number {
    return this.queue.length;
  }

  submit(job: SequenceJob, extract: boolean): Promise<SequenceResult> {
    if (this.closed) return Promise.reject(new Error('the engine is closed'));
    return new Promise((resolve, reject) => {
      this.queue.push({ job, extract, arrived: performance.now(), resolve, reject });
      this.schedule();
    });
  }

  private schedule(): void {
    if (this.running || this.queue.length === 0) return;
    if (this.queue.length >= this.opts.maxBatch || this.opts.gatherMs <= 0) {
      clearTimeout(this.timer);
      this.timer = undefined;
      void this.runNext();
    } else {
      this.timer ??= setTimeout(() => {
        this.timer = undefined;
        void this.runNext();
      }, this.opts.gatherMs);
    }
  }

  /** The oldest sequence and the closest in prompt length of its kind, within the batch limits. */
  private takeBatch(): Waiting[] {
    const oldest = this.queue[0];
    const candidates = this.queue.filter((w) => w.extract === oldest.extract).sort((a, b) => Math.abs(a.job.ids.length - oldest.job.ids.length) - Math.abs(b.job.ids.length - oldest.job.ids.length) || a.arrived - b.arrived);
    const batch: Waiting[] = [];
    let longest = 0;
    for (const w of candidates) {
      if (batch.length >= this.opts.maxBatch) break;
      const width = Math.max(longest, w.job.ids.length);
      if (batch.length > 0 && width * (batch.length + 1) > this.opts.maxBatchTokens) continue;
      batch.push(w);
      longest = width;
    }
    for (const w of batch) this.queue.splice(this.queue.indexOf(w), 1);
    return batch;
  }

  private async runNext(): Promise<void> {
    if (this.running || this.queue.length === 0) return;
    this.running = true;
    const batch = this.takeBatch();
    this.currentBatch = batch.length;
    const started = performance.now();
    try {
      const results = await this.runner.run(batch.map((w) => w.job));
      batch.forEach((w, i) => w.resolve(results[i]));
    } catch (err) {
      // A failed run fails its batch only; the next batch runs as usual.
      for (const w of batch) w.reject(err);
    } finally {
      this.onBatch({ size: batch.length, paddedTokens: batch.length * Math.max(...batch.map((w) => w.job.ids.length)), seconds: (performance.now() - started) / 1000 });
      this.currentBatch = 0;
      this.running = false;
      this.schedule();
    }
  }

  /** Fails what still waits; the running batch finishes. */
  close(): void {
    this.closed = true;
    clearTimeout(this.timer);
    for (const w of this.queue.splice(0)) w.reject(new Error('the inference service is shutting down'));
  }
}
