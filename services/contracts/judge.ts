import { JUDGE_MAX_TOKENS } from '../shared/defaults';

/**
 * What the coordinator and the judge must agree on about judging, and nothing else: the prompt
 * an item is judged with, how its tokens are estimated before it is sent, and what a call is
 * expected to cost. The coordinator uses it to cap spending and for dry runs; the judge to
 * send the prompt. Neither imports the other's folder.
 */

/** The Batch API bills at about half the online price. */
export const BATCH_PRICE_FACTOR = 0.5;

/** Requests per Batch API batch, at most (the API's own limit). */
export const BATCH_API_MAX_REQUESTS = 50_000;

/** The judge prompt: the role's eval_prompt with {question} and {answer} filled in (docs/CONCEPTS.md, "Judge"). */
export function judgePrompt(evalPrompt: string, question: string, answer: string): string {
  // One pass, so an answer that itself contains "{question}" is not filled a second time.
  return evalPrompt.replace(/\{(question|answer)\}/g, (_, field: string) => (field === 'question' ? question : answer));
}

/** A rough token count for text not sent yet (dry runs, spending reservations, calls that timed out): 4 characters a token. */
export function estimateTokens(text: string): number {
  return Math.ceil(text.length / 4);
}

/** The judge's prices as its GetJudgeInfo reports them (GetJudgeInfoResponse has these fields). */
export interface JudgePricing {
  hasPrice: boolean;
  promptPricePerMtok: number;
  completionPricePerMtok: number;
}

/**
 * The expected cost in USD of `prompts` judge calls holding `promptTokens` prompt tokens in all:
 * each call is counted at the judge's most completion tokens, at Batch API prices when `batch`.
 * 0 when the judge has no price for its model.
 */
export function estimateJudgeCost(pricing: JudgePricing | undefined, promptTokens: number, prompts: number, batch = false): number {
  if (!pricing?.hasPrice) return 0;
  const usd = (promptTokens * pricing.promptPricePerMtok + prompts * JUDGE_MAX_TOKENS * pricing.completionPricePerMtok) / 1e6;
  return batch ? usd * BATCH_PRICE_FACTOR : usd;
}
