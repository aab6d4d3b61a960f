/** The score is the first standalone integer of the reply if it lies in 0..3; otherwise there is none. */
export function parseScore(reply: string): number | undefined {
  const match = /\b\d+\b/.exec(reply);
  if (!match) return undefined;
  const n = Number(match[0]);
  return Number.isInteger(n) && n >= 0 && n <= 3 ? n : undefined;
}
