/** The judge prompt: the role's eval_prompt with {question} and {answer} filled in (DESIGN.md section 1). */
export function judgePrompt(evalPrompt: string, question: string, answer: string): string {
  // One pass, so an answer that itself contains "{question}" is not filled a second time.
  return evalPrompt.replace(/\{(question|answer)\}/g, (_, field: string) => (field === 'question' ? question : answer));
}

/** The score is the first standalone integer of the reply if it lies in 0..3; otherwise there is none. */
export function parseScore(reply: string): number | undefined {
  const match = /\b\d+\b/.exec(reply);
  if (!match) return undefined;
  const n = Number(match[0]);
  return Number.isInteger(n) && n >= 0 && n <= 3 ? n : undefined;
}
