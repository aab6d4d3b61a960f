import * as fs from 'node:fs';

/** US dollars per million tokens. */
export interface Price {
  prompt: number;
  completion: number;
}

/**
 * Default prices (USD per 1M tokens, OpenAI's list prices when this was written). Override
 * with --prices (a JSON file of the same shape); a model without a price costs 0 and says so.
 */
export const DEFAULT_PRICES: Record<string, Price> = {
  'gpt-4.1-mini': { prompt: 0.4, completion: 1.6 },
  'gpt-4.1': { prompt: 2.0, completion: 8.0 },
  'gpt-4.1-nano': { prompt: 0.1, completion: 0.4 },
  'gpt-4o-mini': { prompt: 0.15, completion: 0.6 },
  'gpt-4o': { prompt: 2.5, completion: 10.0 },
};

export function loadPrices(file: string): Record<string, Price> {
  if (!file) return DEFAULT_PRICES;
  let json: unknown;
  try {
    json = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    throw new Error(`--prices: cannot read ${file}: ${(err as Error).message}`);
  }
  const prices: Record<string, Price> = {};
  for (const [model, p] of Object.entries(json as Record<string, Price>)) {
    if (!(typeof p?.prompt === 'number' && typeof p?.completion === 'number' && p.prompt >= 0 && p.completion >= 0)) {
      throw new Error(`--prices: ${file}: model ${model} needs non-negative "prompt" and "completion" prices per 1M tokens`);
    }
    prices[model] = { prompt: p.prompt, completion: p.completion };
  }
  return prices;
}

export function costUsd(price: Price | undefined, promptTokens: number, completionTokens: number): number {
  if (!price) return 0;
  return (promptTokens * price.prompt + completionTokens * price.completion) / 1e6;
}
