import * as grpc from '@grpc/grpc-js';
import OpenAI, { toFile } from 'openai';
import type { PollBatchResponse, ScoreRequest, ScoreResponse } from '../../gen/assistant_axis/v1/judge';
import { JUDGE_MAX_TOKENS, JUDGE_TEMPERATURE } from '../shared/defaults';
import { BATCH_PRICE_FACTOR, judgePrompt } from '../contracts/judge';
import { costUsd, Price } from './costs';
import { parseScore } from './prompt';
import { redactSecrets } from './retry';

const ENDED = new Set(['completed', 'failed', 'expired', 'cancelled']);
/** The batch metadata field that holds the caller's submission key. */
const SUBMISSION_KEY = 'axis_submission_key';
/** How many of the most recent batches are searched for a submission key: a retry comes soon after its first try. */
const SUBMISSION_LOOKBACK = 1000;

/**
 * Batch mode over the OpenAI Batch API: the items become one JSONL file of chat-completion
 * requests (custom_id = item id), uploaded and submitted as a batch; polling returns the batch's
 * status and, once it has ended, one result per item from its output and error files. Nothing
 * is kept here: the caller keeps the batch id.
 */
export class BatchJudge {
  constructor(private readonly client: OpenAI, private readonly model: string, private readonly price: Price | undefined) {}

  /**
   * `key`: when given, a batch already made with it (the API keeps it in the batch's metadata)
   * is returned instead of a new one; the same submission sent again after a lost reply costs nothing.
   */
  async submit(items: ScoreRequest[], key = ''): Promise<{ batchId: string; inputFileId: string; existing: boolean }> {
    if (key) {
      const made = await this.findSubmission(key);
      if (made) return { ...made, existing: true };
    }
    const lines = items.map((it) =>
      JSON.stringify({
        custom_id: it.itemId,
        method: 'POST',
        url: '/v1/chat/completions',
        body: { model: this.model, messages: [{ role: 'user', content: judgePrompt(it.evalPrompt, it.question, it.answer) }], max_tokens: JUDGE_MAX_TOKENS, temperature: JUDGE_TEMPERATURE },
      }),
    );
    const file = await this.client.files.create({ file: await toFile(Buffer.from(lines.join('\n') + '\n'), 'judge-batch.jsonl'), purpose: 'batch' });
    const batch = await this.client.batches.create({ input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h', ...(key ? { metadata: { [SUBMISSION_KEY]: key } } : {}) });
    return { batchId: batch.id, inputFileId: file.id, existing: false };
  }

  /** The batch made with this submission key, among the most recent (the list is newest first). */
  private async findSubmission(key: string): Promise<{ batchId: string; inputFileId: string } | undefined> {
    let seen = 0;
    for await (const b of this.client.batches.list({ limit: 100 })) {
      if (b.metadata?.[SUBMISSION_KEY] === key) return { batchId: b.id, inputFileId: b.input_file_id };
      if (++seen >= SUBMISSION_LOOKBACK) return undefined;
    }
    return undefined;
  }

  /** `expected`: the item ids submitted, so that items the API never answered get an error result. */
  async poll(batchId: string, expected: string[]): Promise<PollBatchResponse> {
    const batch = await this.client.batches.retrieve(batchId);
    const counts = batch.request_counts ?? { completed: 0, failed: 0, total: 0 };
    const base = { batchId, status: batch.status, completed: counts.completed, failed: counts.failed, total: counts.total };
    if (!ENDED.has(batch.status)) return { ...base, done: false, results: [] };
    const results = new Map<string, ScoreResponse>();
    for (const fileId of [batch.output_file_id, batch.error_file_id]) {
      if (!fileId) continue;
      const text = await (await this.client.files.content(fileId)).text();
      for (const line of text.split('\n')) {
        if (!line.trim()) continue;
        const r = this.result(JSON.parse(line));
        if (r.itemId) results.set(r.itemId, r);
      }
    }
    for (const id of expected) {
      if (!results.has(id)) results.set(id, empty(id, { code: grpc.status.UNAVAILABLE, message: `the batch ended (${batch.status}) without an answer for this item` }));
    }
    return { ...base, done: true, results: expected.map((id) => results.get(id)!) };
  }

  private result(line: { custom_id?: string; response?: { status_code?: number; body?: any }; error?: { message?: string } | null }): ScoreResponse {
    const itemId = line.custom_id ?? '';
    const status = line.response?.status_code;
    if (line.error || status !== 200) {
      return empty(itemId, { code: grpc.status.UNAVAILABLE, message: `batch request failed${status ? ` (HTTP ${status})` : ''}: ${redactSecrets(line.error?.message ?? line.response?.body?.error?.message ?? 'no reply')}` });
    }
    const body = line.response!.body;
    const reply: string = body?.choices?.[0]?.message?.content ?? '';
    const promptTokens = body?.usage?.prompt_tokens ?? 0;
    const completionTokens = body?.usage?.completion_tokens ?? 0;
    const score = parseScore(reply);
    return {
      itemId,
      score,
      rawReply: reply,
      error: undefined,
      attempts: 1,
      promptTokens,
      completionTokens,
      costUsd: costUsd(this.price, promptTokens, completionTokens) * BATCH_PRICE_FACTOR,
      possiblyBilledTokens: 0,
      // A batch reply cannot be asked again: an unusable one leaves the item unscored, its reply kept.
      unparsed: score === undefined,
    };
  }
}

function empty(itemId: string, error: { code: number; message: string }): ScoreResponse {
  return { itemId, score: undefined, rawReply: '', error, attempts: 1, promptTokens: 0, completionTokens: 0, costUsd: 0, possiblyBilledTokens: 0, unparsed: false };
}
