import { ChildProcess, execFileSync, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseAllDocuments, stringify } from 'yaml';
import { RunState } from '../../gen/assistant_axis/v1/coordinator';
import type { LocalStack } from '../../services/cli/stack';
import { FakeOpenAIServer } from '../doubles/openai-server';
import { coordinatorClient, startRun, waitFor, watchRun } from '../helpers/grpc';
import { freePort, ROOT, testStack } from '../kit/stack';
import { priceFile, tempDir } from '../kit/files';
import { writeSafetensors } from '../../services/shared/safetensors';

/**
 * A real Prometheus (Debian's package; .ci/run installs it) scrapes the four services during a
 * run: every metric the Grafana dashboard and the alert rules name exists, every dashboard query
 * returns data, and promtool accepts the chart's rules.
 */
const PROMETHEUS = '/usr/bin/prometheus';
const PROMTOOL = '/usr/bin/promtool';
const HELM = process.env.AXIS_HELM ? path.resolve(ROOT, process.env.AXIS_HELM) : '';
const available = fs.existsSync(PROMETHEUS) && fs.existsSync(PROMTOOL) && !!HELM;
if (!available && process.env.AXIS_REQUIRE_PROMETHEUS) throw new Error('prometheus, promtool and AXIS_HELM are required here (AXIS_REQUIRE_PROMETHEUS is set)');
// Skipped only where Prometheus is not installed (apt-get install prometheus) or outside `make test`.
const maybe = available ? describe : describe.skip;
const CHART = path.join(ROOT, 'helm', 'assistant-axis');

function chartRules(): { groups: { name: string; rules: { alert: string; expr: string }[] }[] } {
  const out = execFileSync(HELM, ['template', 'axis', CHART, '--set', 'inference.model.existingClaim=m', '--set', 'metrics.prometheusRule.enabled=true', '--set', 'inference.monitor.axisFile=/models/axis.safetensors']).toString();
  const rule = parseAllDocuments(out).map((d) => d.toJS()).find((d) => d?.kind === 'PrometheusRule');
  return rule.spec;
}

function dashboardQueries(): string[] {
  const dash = JSON.parse(fs.readFileSync(path.join(CHART, 'dashboards', 'assistant-axis.json'), 'utf8'));
  return dash.panels.flatMap((p: { targets?: { expr: string }[] }) => (p.targets ?? []).map((t) => t.expr.replaceAll('$run', '.*')));
}

/** `promtool test rules` on the chart's alert rules: one test of 1-minute series and the alerts expected at given times. */
function promtoolRuleTest(inputSeries: { series: string; values: string }[], alertRuleTest: unknown[]): { status: number | null; output: string } {
  const dir = tempDir('rules');
  fs.writeFileSync(path.join(dir, 'rules.yml'), stringify(chartRules()));
  const tests = { rule_files: ['rules.yml'], evaluation_interval: '1m', tests: [{ interval: '1m', input_series: inputSeries, alert_rule_test: alertRuleTest }] };
  fs.writeFileSync(path.join(dir, 'tests.yml'), stringify(tests));
  const r = spawnSync(PROMTOOL, ['test', 'rules', path.join(dir, 'tests.yml')], { encoding: 'utf8' });
  return { status: r.status, output: r.stdout + r.stderr };
}

const metricNames = (exprs: string[]) => [...new Set(exprs.flatMap((e) => e.match(/axis_[a-z0-9_]+/g) ?? []))];

maybe('Prometheus and the dashboard', () => {
  let stack: LocalStack;
  let prometheus: ChildProcess;
  let promUrl = '';
  let chatPort = 0;
  const CHAT_TOKEN = 'prometheus-chat-token';
  const judge = new FakeOpenAIServer({ latencyMs: () => 5 });

  beforeAll(async () => {
    await judge.start();
    const dir = tempDir('prom');
    const prices = priceFile({ 'judge-prom': { prompt: 1, completion: 2 } });
    // An axis of the synthetic model's shape (8 layers x 64) to monitor answers with (the persona row).
    const axisFile = path.join(dir, 'axis.safetensors');
    await writeSafetensors(axisFile, { axis: { shape: [8, 64], data: Float32Array.from({ length: 8 * 64 }, (_, i) => Math.sin(i)) } });
    // The chat endpoint on too (its panel).
    chatPort = await freePort();
    const chatToken = path.join(dir, 'chat-token');
    fs.writeFileSync(chatToken, CHAT_TOKEN);
    ({ stack } = await testStack('prom', {
      args: {
        // About 15 s of run, so that Prometheus scrapes it while it is active.
        inference: ['--synthetic-tokens-per-second', '30', '--capacity', '4', '--monitor-axis', axisFile, '--monitor-threshold', '0', '--chat-port', String(chatPort), '--chat-token-file', chatToken],
        judge: ['--provider', 'openai', '--base-url', judge.baseUrl, '--model', 'judge-prom', '--prices', prices],
      },
    }));
    await stack.startAll();
    const port = await freePort();
    promUrl = `http://127.0.0.1:${port}`;
    const config = {
      global: { scrape_interval: '1s', evaluation_interval: '1s' },
      // The target labels a ServiceMonitor's scrape gives (the Prometheus Operator's relabelling:
      // job, namespace, service, pod, endpoint): a label of the same name from the service would come out as exported_*.
      scrape_configs: (['coordinator', 'inference', 'judge', 'aggregation'] as const).map((s) => ({
        job_name: `axis-${s}`,
        static_configs: [{ targets: [`127.0.0.1:${stack.metricsPorts[s]}`], labels: { namespace: 'research', service: `axis-${s}`, pod: `axis-${s}-0`, endpoint: 'metrics', container: s } }],
      })),
    };
    fs.writeFileSync(path.join(dir, 'prometheus.yml'), stringify(config));
    prometheus = spawn(PROMETHEUS, [`--config.file=${path.join(dir, 'prometheus.yml')}`, `--storage.tsdb.path=${path.join(dir, 'data')}`, `--web.listen-address=127.0.0.1:${port}`], { stdio: 'ignore' });
    await waitFor('Prometheus to be ready', async () => ((await fetch(`${promUrl}/-/ready`).catch(() => undefined))?.ok ? true : undefined), 60_000);
  }, 120_000);

  afterAll(async () => {
    prometheus?.kill();
    await stack?.stopAll();
    await judge.stop();
  });

  async function query(expr: string): Promise<unknown[]> {
    const res = await fetch(`${promUrl}/api/v1/query?query=${encodeURIComponent(expr)}`);
    const body = (await res.json()) as { status: string; data: { result: unknown[] }; error?: string };
    if (body.status !== 'success') throw new Error(`${expr}: ${body.error}`);
    return body.data.result;
  }

  it('scrapes every metric the dashboard and the alerts use, and every dashboard query returns data during a run', async () => {
    const client = coordinatorClient(stack.address('coordinator'));
    await startRun(client, { name: 'watched', roles: ['chef', 'poet', 'default'], questionCount: 4, minCount: 1, maxNewTokens: 16 });
    // One chat answer while the run goes on.
    const headers = { authorization: `Bearer ${CHAT_TOKEN}`, 'content-type': 'application/json' };
    const models = (await (await fetch(`http://127.0.0.1:${chatPort}/v1/models`, { headers })).json()) as { data: { id: string }[] };
    const chat = await fetch(`http://127.0.0.1:${chatPort}/v1/chat/completions`, { method: 'POST', headers, body: JSON.stringify({ model: models.data[0].id, messages: [{ role: 'user', content: 'Hello?' }], max_tokens: 8 }) });
    expect(chat.status).toBe(200);
    const queries = dashboardQueries();
    const rules = chartRules().groups.flatMap((g) => g.rules.map((r) => r.expr));
    const names = metricNames([...queries, ...rules]);
    expect(names.length).toBeGreaterThanOrEqual(8);
    // While the run is active: every named metric has a series, every panel's query has data.
    let empty: string[] = [];
    await waitFor(
      'every metric and panel to have data',
      async () => {
        empty = [];
        for (const n of names) if ((await query(`count(${n})`)).length === 0) empty.push(n);
        for (const q of queries) if ((await query(q)).length === 0) empty.push(q);
        return empty.length === 0 ? true : undefined;
      },
      40_000,
    ).catch(() => undefined);
    expect(empty).toEqual([]);
    // No series had a label of its own renamed by the scrape's target labels.
    const renamed = (await query('count by (__name__) ({__name__=~".+", exported_service!=""} or {__name__=~".+", exported_pod!=""} or {__name__=~".+", exported_namespace!=""} or {__name__=~".+", exported_job!=""})')) as { metric: { __name__: string } }[];
    expect(renamed.map((r) => r.metric.__name__)).toEqual([]);
    // The Node.js process metrics under their usual names, one series per service.
    expect(((await query('process_cpu_user_seconds_total')) as unknown[]).length).toBe(4);
    const chats = (await query('sum(axis_inference_chat_answers_total{capped="no"})')) as { value: [number, string] }[];
    expect(chats[0].value[1]).toBe('1');
    const done = await watchRun(client, 'watched', () => undefined);
    expect(done.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    // The ended run leaves the per-run series; the ledger's count by state has it.
    await waitFor('the ended run to leave the per-run series', async () => {
      const text = await (await fetch(`http://127.0.0.1:${stack.metricsPorts.coordinator}/metrics`)).text();
      return !/run="watched"/.test(text) && /^axis_coordinator_runs\{state="SUCCEEDED"\} 1$/m.test(text) ? true : undefined;
    }, 10_000);
    client.close();
    // The scrape targets are all up.
    const up = (await query('up')) as { value: [number, string] }[];
    expect(up.length).toBe(4);
    expect(up.every((u) => u.value[1] === '1')).toBe(true);
  }, 120_000);

  it('has a dashboard that picks its Prometheus, and gives each panel one unit and latency as quantiles', () => {
    const dash = JSON.parse(fs.readFileSync(path.join(CHART, 'dashboards', 'assistant-axis.json'), 'utf8'));
    expect(dash.templating.list[0]).toMatchObject({ name: 'datasource', type: 'datasource', query: 'prometheus' });
    const panels = dash.panels.filter((p: { type: string }) => p.type !== 'row');
    for (const p of panels) {
      expect([p.title, p.datasource]).toEqual([p.title, { type: 'prometheus', uid: '${datasource}' }]);
      expect([p.title, typeof p.fieldConfig?.defaults?.unit]).toEqual([p.title, 'string']);
    }
    const exprs = dashboardQueries();
    for (const m of ['axis_inference_time_to_first_token_seconds', 'axis_inference_time_per_output_token_seconds']) for (const qu of ['0.5', '0.95', '0.99']) expect(exprs).toContain(`histogram_quantile(${qu}, sum by (le) (rate(${m}_bucket[5m])))`);
    expect(exprs.some((e) => e.includes('axis_inference_requests_waiting'))).toBe(true);
    expect(exprs.some((e) => e.includes('grpc_server_handling_seconds_bucket'))).toBe(true);
  });

  it('promtool accepts the chart\'s alert rules', () => {
    const file = path.join(tempDir('rules'), 'rules.yml');
    fs.writeFileSync(file, stringify(chartRules()));
    const r = spawnSync(PROMTOOL, ['check', 'rules', file], { encoding: 'utf8' });
    expect(r.stdout + r.stderr).toMatch(/SUCCESS: 5 rules found/);
    expect(r.status).toBe(0);
  });

  it('promtool: the stalled-run alert fires for an executing run that makes no progress, not for one waiting on judge batches, one moving, or one that ended', () => {
    const run = (name: string, aggregated: string, batches?: string) => [
      { series: `axis_coordinator_run_items{run="${name}",stage="aggregated"}`, values: aggregated },
      { series: `axis_coordinator_run_items{run="${name}",stage="total"}`, values: aggregated.replace(/\d+\+\d+x(\d+)|\d+x(\d+)/g, (_m, a, b) => `100x${a ?? b}`) },
      ...(batches ? [{ series: `axis_coordinator_run_waiting_for_judge_batches{run="${name}"}`, values: batches }] : []),
    ];
    const r = promtoolRuleTest(
      [
        // 10 of 100 items for an hour: stalled.
        ...run('stuck', '10x60', '0x60'),
        // The same, in its judge batches (the Batch API takes hours): not stalled.
        ...run('batched', '10x60', '1x60'),
        // One more item a minute: moving.
        ...run('moving', '0+1x60'),
        // Stopped at 20 minutes and ended (failed, cancelled, paused: its series leave).
        ...run('ended', '10x20 _x40'),
      ],
      [{ eval_time: '60m', alertname: 'AssistantAxisRunStalled', exp_alerts: [{ exp_labels: { severity: 'warning', run: 'stuck' }, exp_annotations: { summary: 'Run stuck has made no progress for 15 minutes' } }] }],
    );
    expect(r.output).toMatch(/SUCCESS/);
    expect(r.status).toBe(0);
  });

  it('promtool: the persona alert fires when most answers stay below the threshold for its time, and not otherwise', () => {
    const series = (model: string, below: string, all: string) => [
      { series: `axis_inference_answers_below_threshold_total{model_name="${model}"}`, values: below },
      { series: `axis_inference_monitored_answers_total{model_name="${model}"}`, values: all },
    ];
    const summary = (model: string) => `More than 50% of ${model}'s answers have drifted below the persona threshold on the Assistant Axis for 30 minutes`;
    const r = promtoolRuleTest(
      [
        // 8 of 10 answers a minute below the threshold for an hour: fires.
        ...series('drifting', '0+8x60', '0+10x60'),
        // 3 of 10: does not.
        ...series('steady', '0+3x60', '0+10x60'),
        // 8 of 10, but only for the last 20 minutes (3 of 10 before): not yet.
        ...series('lately', '0+3x40 128+8x20', '0+10x60'),
      ],
      [
        { eval_time: '60m', alertname: 'AssistantAxisPersonaDrift', exp_alerts: [{ exp_labels: { severity: 'warning', model_name: 'drifting' }, exp_annotations: { summary: summary('drifting') } }] },
        { eval_time: '20m', alertname: 'AssistantAxisPersonaDrift', exp_alerts: [] },
      ],
    );
    expect(r.output).toMatch(/SUCCESS/);
    expect(r.status).toBe(0);
  });
});
