/** The ledger's rows as the coordinator reads them, and how they map from SQLite's. */

/** What a run was asked to do, fully resolved (defaults filled in), as stored in the ledger. */
export interface RunSpec {
  name: string;
  model: string;
  dataDir: string;
  roles: string[];
  questionCount: number;
  minCount: number;
  temperature: number;
  topP: number;
  maxNewTokens: number;
  maxContext: number;
  seed: number;
  layers: number[];
  dataHash: string;
  /** Judge spending cap in USD (not part of a run's identity: raising it resumes a paused run). */
  maxJudgeCostUsd?: number;
  /** Judge through the Batch API instead of online calls. */
  judgeBatch?: boolean;
  /** Another axis to compare with in the report (absolute path of a safetensors file). */
  compareAxis?: string;
  /** A finished run (its name, under the output root) to compare with in the report. */
  compareRun?: string;
  /** Keep every item's activation (bf16) in activations/<role>.safetensors. */
  archiveActivations?: boolean;
  /** A reference run imported (absolute path): its answers are measured, not generated. */
  importDir?: string;
  /** Generate the text, then measure it by a separate prefill (Extract), as the reference does. */
  twoPass?: boolean;
  /** The chat template's thinking switch (Qwen 3): the model thinks before it answers. */
  enableThinking?: boolean;
  /** An experiment of the inference replicas' capping config, generated and measured with. */
  cappingExperiment?: string;
}

/** A batch submitted to the judge's Batch API and the items in it. */
export interface JudgeBatchRow {
  batchId: string;
  /** Item ids as sent to the judge (`run/role/key`). */
  itemIds: string[];
}

/** Spec fields that may change between StartRun calls of the same run. */
export const ADJUSTABLE_SPEC_FIELDS: (keyof RunSpec)[] = ['maxJudgeCostUsd', 'compareAxis', 'compareRun'];

/** What the judge reported for one item, all attempts. */
export interface JudgeUsage {
  attempts: number;
  promptTokens: number;
  completionTokens: number;
  costUsd: number;
  possiblyBilledTokens: number;
}

export type RunStateName = 'PENDING' | 'RUNNING' | 'COMPUTING' | 'SUCCEEDED' | 'FAILED' | 'CANCELLED' | 'PAUSED';

export interface RunRow {
  name: string;
  spec: RunSpec;
  state: RunStateName;
  createdAt: string;
  finishedAt: string;
  error: string;
  backend: string;
  judge: string;
  summary: unknown;
}

export interface ItemRow {
  role: string;
  promptIndex: number;
  questionIndex: number;
  key: string;
  /** Whether the answer's text is saved (generated, or imported). */
  hasText: boolean;
  /** The text itself, in rows read with it (a role's files); null in the scheduler's pages, which read it when needed. */
  text: string | null;
  promptTokens: number;
  completionTokens: number;
  finishReason: string;
  activationAcked: boolean;
  judged: boolean;
  score: number | null;
  rawReply: string;
  scoreAcked: boolean;
  judgeUsage: JudgeUsage;
}

export function toRunRow(r: Record<string, any>): RunRow {
  return {
    name: r.name,
    spec: JSON.parse(r.spec),
    state: r.state,
    createdAt: r.created_at,
    finishedAt: r.finished_at,
    error: r.error,
    backend: r.backend,
    judge: r.judge,
    summary: r.summary ? JSON.parse(r.summary) : undefined,
  };
}

/** Done: aggregation acknowledged the activation and, for judged roles, the score (isDefaultRole in SQL). */
export const DONE = "activation_acked = 1 AND (INSTR(role, 'default') > 0 OR (judged = 1 AND score_acked = 1))";
export const ITEM_COLUMNS_WITHOUT_TEXT =
  'role, p, q, key, NULL AS text, text IS NOT NULL AS has_text, prompt_tokens, completion_tokens, finish_reason, activation_acked, judged, score, raw_reply, score_acked, judge_attempts, judge_prompt_tokens, judge_completion_tokens, judge_cost_usd, judge_possibly_billed_tokens';

export interface RoleCounts {
  role: string;
  total: number;
  generated: number;
  judged: number;
  unscored: number;
  done: number;
  recovered: number;
  usage: JudgeUsage;
}

export function toItemRow(r: Record<string, any>): ItemRow {
  return {
    role: r.role,
    promptIndex: r.p,
    questionIndex: r.q,
    key: r.key,
    hasText: r.has_text === undefined ? r.text !== null : !!r.has_text,
    text: r.text,
    promptTokens: r.prompt_tokens,
    completionTokens: r.completion_tokens,
    finishReason: r.finish_reason,
    activationAcked: !!r.activation_acked,
    judged: !!r.judged,
    score: r.score,
    rawReply: r.raw_reply,
    scoreAcked: !!r.score_acked,
    judgeUsage: {
      attempts: r.judge_attempts ?? 0,
      promptTokens: r.judge_prompt_tokens ?? 0,
      completionTokens: r.judge_completion_tokens ?? 0,
      costUsd: r.judge_cost_usd ?? 0,
      possiblyBilledTokens: r.judge_possibly_billed_tokens ?? 0,
    },
  };
}
