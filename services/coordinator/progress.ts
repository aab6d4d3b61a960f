import { isDefaultRole } from '../shared/names';
import type { JudgeUsage, RoleCounts } from './ledgerRows';

/** What GetRun and WatchRun show of a run's progress (the Run message's progress field). */
export interface Progress {
  /** Items whose activation was measured again by Extract after a restart lost it. */
  recovered: number;
  itemsTotal: number;
  generated: number;
  judged: number;
  toJudge: number;
  aggregated: number;
  rolesTotal: number;
  rolesWritten: number;
  skipped: number;
  itemsPerSecond: number;
  etaSeconds: number;
  judgeCostUsd: number;
  judgePromptTokens: number;
  judgeCompletionTokens: number;
  judgePossiblyBilledTokens: number;
  judgeUnscored: number;
  judgeBatchesOpen: number;
}

export function emptyProgress(rolesTotal: number): Progress {
  return {
    recovered: 0,
    itemsTotal: 0,
    generated: 0,
    judged: 0,
    toJudge: 0,
    aggregated: 0,
    rolesTotal,
    rolesWritten: 0,
    skipped: 0,
    itemsPerSecond: 0,
    etaSeconds: 0,
    judgeCostUsd: 0,
    judgePromptTokens: 0,
    judgeCompletionTokens: 0,
    judgePossiblyBilledTokens: 0,
    judgeUnscored: 0,
    judgeBatchesOpen: 0,
  };
}

export function addUsage(p: Progress, u: JudgeUsage): void {
  p.judgeCostUsd += u.costUsd;
  p.judgePromptTokens += u.promptTokens;
  p.judgeCompletionTokens += u.completionTokens;
  p.judgePossiblyBilledTokens += u.possiblyBilledTokens;
}

/** Adds the ledger's per-role counts to a progress: counted by SQL, so no run's items are held. */
export function addCounts(p: Progress, counts: RoleCounts[]): void {
  for (const c of counts) {
    p.itemsTotal += c.total;
    p.generated += c.generated;
    if (!isDefaultRole(c.role)) {
      p.toJudge += c.total;
      p.judged += c.judged;
      p.judgeUnscored += c.unscored;
    }
    p.aggregated += c.done;
    p.recovered += c.recovered;
    addUsage(p, c.usage);
  }
}

/**
 * The progress of one execution of a run: started from the ledger's counts at each pass, then
 * moved on as items go through their steps. `view` is the object Get/Watch read.
 */
export class RunProgress {
  readonly view: Progress;
  private readonly startedAt = Date.now();
  private doneThisAttempt = 0;

  constructor(rolesTotal: number) {
    this.view = emptyProgress(rolesTotal);
  }

  /** A new pass over the items: counts from the ledger; on the first pass, what is already done counts as skipped. */
  startPass(counts: RoleCounts[], rolesWritten: number, firstPass: boolean): void {
    const p = this.view;
    Object.assign(p, { ...emptyProgress(p.rolesTotal), skipped: p.skipped, rolesWritten });
    addCounts(p, counts);
    if (firstPass) p.skipped = p.aggregated;
  }

  addUsage(u: JudgeUsage): void {
    addUsage(this.view, u);
  }

  generated(): void {
    this.view.generated++;
  }

  recovered(): void {
    this.view.recovered++;
  }

  judged(score: number | null): void {
    this.view.judged++;
    if (score === null) this.view.judgeUnscored++;
  }

  roleWritten(): void {
    this.view.rolesWritten++;
  }

  /** An item all of whose steps aggregation acknowledged: the rate and the time left follow. */
  itemDone(): void {
    const p = this.view;
    p.aggregated++;
    this.doneThisAttempt++;
    const elapsed = (Date.now() - this.startedAt) / 1000;
    p.itemsPerSecond = this.doneThisAttempt / Math.max(elapsed, 1e-3);
    p.etaSeconds = (p.itemsTotal - p.aggregated) / Math.max(p.itemsPerSecond, 1e-9);
  }
}
