/**
 * What a run's parts wait on: something changed (a generation, an ingest or a judgement ended,
 * a replica came or went, the run is stopping). Waiters are woken all at once and look again.
 */
export class ChangeSignal {
  private waiters: (() => void)[] = [];

  notify(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Until something changes (or, given `maxMs`, at most that long: for what nothing announces). */
  wait(maxMs?: number): Promise<void> {
    return new Promise((resolve) => {
      this.waiters.push(resolve);
      if (maxMs !== undefined) {
        setTimeout(() => {
          this.waiters = this.waiters.filter((w) => w !== resolve);
          resolve();
        }, maxMs);
      }
    });
  }
}

/** A count of work in flight at one step (generation, ingest, judge): counted up, run, counted down, waiters woken. */
export class InFlight {
  private n = 0;

  constructor(private readonly changes: ChangeSignal) {}

  get count(): number {
    return this.n;
  }

  async around<T>(work: () => Promise<T>): Promise<T> {
    this.n++;
    try {
      return await work();
    } finally {
      this.n--;
      this.changes.notify();
    }
  }
}
