import type { Run } from '../../gen/assistant_axis/v1/coordinator';
import { stateName } from './client';

/** A one-line progress bar: redrawn in place on a terminal, a line per 10% otherwise. */
export class ProgressBar {
  private lastDecile = -1;
  constructor(private readonly out: NodeJS.WriteStream = process.stderr) {}

  update(run: Run): void {
    const p = run.progress;
    if (!p || p.itemsTotal === 0) return;
    const frac = p.aggregated / p.itemsTotal;
    const width = 30;
    const filled = Math.round(frac * width);
    const bar = '#'.repeat(filled) + '-'.repeat(width - filled);
    const eta = p.etaSeconds > 0 && frac < 1 ? ` eta ${formatSeconds(p.etaSeconds)}` : '';
    const cost = p.judgeCostUsd > 0 ? ` $${p.judgeCostUsd.toFixed(4)}` : '';
    const line = `[${bar}] ${(frac * 100).toFixed(0).padStart(3)}% ${p.aggregated}/${p.itemsTotal} items | generated ${p.generated} judged ${p.judged}/${p.toJudge}${cost} | roles written ${p.rolesWritten}/${p.rolesTotal} | ${p.itemsPerSecond.toFixed(1)} items/s${eta} | ${stateName(run.state)}`;
    if (this.out.isTTY) {
      this.out.write(`\r${line.slice(0, (this.out.columns || 160) - 1)}\x1b[K`);
    } else {
      const decile = Math.floor(frac * 10);
      if (decile !== this.lastDecile) {
        this.lastDecile = decile;
        this.out.write(line + '\n');
      }
    }
  }

  done(): void {
    if (this.out.isTTY) this.out.write('\n');
  }
}

/**
 * Bytes of a long job (a model build): on a terminal a bar redrawn in place, with the rate and
 * the time left; otherwise (a pod's log) a line at each tenth.
 */
export class ByteProgress {
  private lastDecile = -1;
  private lastDraw = 0;
  private readonly started = Date.now();
  constructor(private readonly label: string, private readonly out: NodeJS.WriteStream = process.stderr) {}

  update(done: number, total: number): void {
    if (!(total > 0)) return;
    const frac = Math.min(1, done / total);
    const decile = Math.floor(frac * 10);
    const now = Date.now();
    if (this.out.isTTY ? now - this.lastDraw < 200 && frac < 1 : decile === this.lastDecile) return;
    this.lastDraw = now;
    this.lastDecile = decile;
    const seconds = (now - this.started) / 1000;
    const rate = seconds > 0 ? done / seconds : 0;
    const left = rate > 0 && frac < 1 ? `, ${formatSeconds((total - done) / rate)} left` : '';
    const gib = (b: number) => (b / 2 ** 30).toFixed(2);
    const text = `${this.label} ${(frac * 100).toFixed(0).padStart(3)}%: ${gib(done)} of ${gib(total)} GiB, ${(rate / 2 ** 20).toFixed(0)} MiB/s${left}`;
    if (this.out.isTTY) {
      const width = 24;
      const filled = Math.round(frac * width);
      this.out.write(`\r[${'#'.repeat(filled)}${'-'.repeat(width - filled)}] ${text}`.slice(0, (this.out.columns || 160) - 1) + '\x1b[K');
    } else {
      this.out.write(text + '\n');
    }
  }

  /** Ends the bar's line on a terminal (before other output, and at the end). */
  done(): void {
    if (this.out.isTTY && this.lastDraw) this.out.write('\n');
    this.lastDraw = 0;
  }
}

export function formatSeconds(s: number): string {
  if (s < 60) return `${s.toFixed(0)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${Math.round(s % 60)}s`;
  return `${Math.floor(s / 3600)}h${Math.round((s % 3600) / 60)}m`;
}

/** The end-of-run summary: roles kept and left out with their counts, the axis norm per layer. */
export function formatSummary(run: Run): string {
  const s = run.summary;
  const lines: string[] = [];
  lines.push(`run ${run.name}: ${stateName(run.state)}${run.message ? ` (${run.message})` : ''}`);
  lines.push(`  model ${run.model}, inference backend: ${run.backend}`);
  lines.push(`  judge: ${run.judge}`);
  const p = run.progress;
  if (p && p.judged > 0) lines.push(`  judge usage: ${p.judged} items judged (${p.judgeUnscored} without a usable score), ${p.judgePromptTokens} prompt + ${p.judgeCompletionTokens} completion tokens, $${p.judgeCostUsd.toFixed(4)}${p.judgePossiblyBilledTokens ? `, ${p.judgePossiblyBilledTokens} tokens in calls that timed out (possibly billed)` : ''}`);
  lines.push(`  output: ${run.outputDir}`);
  if (run.error) lines.push(`  error: ${run.error}`);
  if (!s) return lines.join('\n');
  const list = (xs: { role: string; count: number }[]) => (xs.length ? xs.map((x) => `${x.role} (${x.count})`).join(', ') : 'none');
  lines.push(`  roles kept (score-3 items >= min_count ${run.minCount}): ${s.kept.length}: ${list(s.kept)}`);
  lines.push(`  roles left out: ${s.leftOut.length}: ${list(s.leftOut)}`);
  lines.push(`  default items: ${list(s.defaults)}`);
  lines.push(`  axis [${s.numLayers}, ${s.hiddenSize}], norm per layer:`);
  const norms = s.axisNorms.map((n, l) => `${String(l).padStart(3)}: ${n.toFixed(4)}`);
  for (let i = 0; i < norms.length; i += 6) lines.push('    ' + norms.slice(i, i + 6).join('   '));
  return lines.join('\n');
}
