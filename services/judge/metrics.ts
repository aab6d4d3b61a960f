import type { Registry } from 'prom-client';
import { prom } from '../shared/metrics';

/** The judge's Prometheus metrics. */
export function judgeMetrics(registry: Registry) {
  const registers = [registry];
  return {
    requests: new prom.Counter({ name: 'axis_judge_requests_total', help: 'API calls by outcome (ok, rate_limited, server_error, timeout, connection, bad_response, client_error, cancelled)', labelNames: ['outcome'], registers }),
    items: new prom.Counter({ name: 'axis_judge_items_total', help: 'Items finished, by result (scored, unscored, error)', labelNames: ['result'], registers }),
    retries: new prom.Counter({ name: 'axis_judge_retries_total', help: 'Calls made again, by reason', labelNames: ['reason'], registers }),
    rateWaits: new prom.Counter({ name: 'axis_judge_rate_limited_wait_seconds_total', help: 'Time calls waited for the rate limit', registers }),
    tokens: new prom.Counter({ name: 'axis_judge_tokens_total', help: 'Tokens reported by the API, by model and kind (possibly_billed: calls that timed out)', labelNames: ['model', 'kind'], registers }),
    cost: new prom.Counter({ name: 'axis_judge_cost_usd_total', help: 'Judge spending in USD, by model (from the price table)', labelNames: ['model'], registers }),
    inFlight: new prom.Gauge({ name: 'axis_judge_in_flight', help: 'API calls in flight', registers }),
    latency: new prom.Histogram({ name: 'axis_judge_item_seconds', help: 'Time to score one item, retries included', buckets: [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300], registers }),
  };
}

export type JudgeMetrics = ReturnType<typeof judgeMetrics>;
