import { BATCH_PRICE_FACTOR, estimateJudgeCost, estimateTokens, judgePrompt } from '../../services/contracts/judge';

describe('the judge contract', () => {
  const pricing = { hasPrice: true, promptPricePerMtok: 0.4, completionPricePerMtok: 1.6 };

  it('estimates a call at its prompt tokens plus the most completion tokens the judge asks for (10)', () => {
    // 1,000 prompt tokens and 10 completion tokens at $0.40 / $1.60 per million.
    expect(estimateJudgeCost(pricing, 1000, 1)).toBeCloseTo((1000 * 0.4 + 10 * 1.6) / 1e6, 15);
    // Three calls holding 3,000 prompt tokens between them: three times the completion tokens.
    expect(estimateJudgeCost(pricing, 3000, 3)).toBeCloseTo((3000 * 0.4 + 30 * 1.6) / 1e6, 15);
  });

  it('halves the estimate at Batch API prices, and is 0 without a price', () => {
    expect(BATCH_PRICE_FACTOR).toBe(0.5);
    expect(estimateJudgeCost(pricing, 1000, 1, true)).toBeCloseTo(((1000 * 0.4 + 10 * 1.6) / 1e6) / 2, 15);
    expect(estimateJudgeCost({ ...pricing, hasPrice: false }, 1000, 1)).toBe(0);
    expect(estimateJudgeCost(undefined, 1000, 1)).toBe(0);
  });

  it('counts 4 characters a token, rounding up', () => {
    expect(estimateTokens('')).toBe(0);
    expect(estimateTokens('abcd')).toBe(1);
    expect(estimateTokens('abcde')).toBe(2);
  });

  it('fills the prompt once, so an answer quoting a placeholder is left as written', () => {
    expect(judgePrompt('Q: {question}\nA: {answer}', 'why?', 'because {question}')).toBe('Q: why?\nA: because {question}');
  });
});
