import { Tiktoken } from 'js-tiktoken/lite';
import o200kBase from 'js-tiktoken/ranks/o200k_base';

/**
 * Judge prompt tokens for a dry run's cost, counted with o200k_base, the tokenizer of OpenAI's
 * current models (gpt-4o, gpt-4.1, gpt-5, the o-series) instead of 4 characters a token. A
 * filled prompt is counted by its parts (the eval prompt's text around {question} and {answer},
 * the question, the answer), each part once however many prompts share it: a full run's 66,000
 * prompts are a few hundred distinct parts. Parts counted apart may take a token more at a joint
 * than the whole, never fewer in practice, so the sum stays an upper bound.
 */
export class JudgeTokenCounter {
  private static shared?: Tiktoken;
  private readonly cache = new Map<string, number>();

  /** The encoder, built once per process (about a second: its 200k-token table). */
  private static encoder(): Tiktoken {
    JudgeTokenCounter.shared ??= new Tiktoken(o200kBase);
    return JudgeTokenCounter.shared;
  }

  /** Tokens of a text seen once (an imported answer): counted, not kept. */
  static count(text: string): number {
    return text ? JudgeTokenCounter.encoder().encode(text).length : 0;
  }

  tokens(text: string): number {
    let n = this.cache.get(text);
    if (n === undefined) {
      n = JudgeTokenCounter.count(text);
      this.cache.set(text, n);
    }
    return n;
  }

  /** An eval prompt filled with a question, its answer counted as `answerTokens`. */
  prompt(evalPrompt: string, question: string, answerTokens: number): number {
    let total = 0;
    for (const part of evalPrompt.split(/(\{question\}|\{answer\})/)) {
      if (part === '{question}') total += this.tokens(question);
      else if (part === '{answer}') total += answerTokens;
      else total += this.tokens(part);
    }
    return total;
  }
}
