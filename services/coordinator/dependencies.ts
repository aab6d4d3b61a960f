import type { Logger } from '../shared/logger';
import type { RunManager } from './runManager';
import type { Upstreams } from './upstreams';

/**
 * Readiness: the coordinator is ready when every dependency answers, checked at start and every
 * few seconds; once they all do, the runs a previous coordinator left unfinished are resumed.
 */
export function watchDependencies(upstreams: Upstreams, runs: RunManager, report: { ready(dependency: string, ok: boolean): void; setReady(ok: boolean): void }, log: Logger): void {
  let resumed = false;
  const check = async () => {
    const results = await Promise.all([
      ...(await upstreams.inference.refreshAll()),
      upstreams.judge.refresh().then(() => true, () => false),
      upstreams.aggregation.runState('probe').then(() => true, () => false),
    ]);
    const [aggOk, judgeOk] = [results.pop()!, results.pop()!];
    const infOk = results.some(Boolean);
    report.ready('inference', infOk);
    report.ready('judge', judgeOk);
    report.ready('aggregation', aggOk);
    const ok = infOk && judgeOk && aggOk;
    report.setReady(ok);
    if (ok && !resumed) resumed = await runs.resumeUnfinished();
  };
  const loop = async () => {
    try {
      await check();
    } catch (err) {
      log.error({ err }, 'dependency check failed');
    }
    setTimeout(loop, resumed ? 5000 : 500).unref();
  };
  void loop();
}
