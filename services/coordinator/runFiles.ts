import * as path from 'node:path';
import type { ChatMessage } from '../../gen/assistant_axis/v1/common';
import { writeFileAtomic } from '../shared/files';
import { isDefaultRole } from '../shared/names';
import type { ItemRow } from './ledger';

/** One line of `responses/<role>.jsonl`, exactly the reference pipeline's fields. */
export interface ResponseRecord {
  system_prompt: string;
  prompt_index: number;
  question_index: number;
  question: string;
  conversation: ChatMessage[];
  label: 'pos';
}

export function responseRecord(systemPrompt: string, promptIndex: number, questionIndex: number, question: string, messages: ChatMessage[], answer: string): ResponseRecord {
  return {
    system_prompt: systemPrompt,
    prompt_index: promptIndex,
    question_index: questionIndex,
    question,
    conversation: [...messages.map((m) => ({ role: m.role, content: m.content })), { role: 'assistant', content: answer }],
    label: 'pos',
  };
}

/**
 * Writes a finished role's reference-format files, each atomically and in (prompt, question)
 * order: `responses/<role>.jsonl` and, for judged roles, `scores/<role>.json` = {key: score}
 * holding the items the judge scored.
 */
export async function writeRoleFiles(runDir: string, role: string, items: ItemRow[], record: (item: ItemRow) => ResponseRecord): Promise<void> {
  const lines = items.map((it) => JSON.stringify(record(it))).join('\n') + '\n';
  await writeFileAtomic(path.join(runDir, 'responses', `${role}.jsonl`), lines);
  if (!isDefaultRole(role)) {
    const scores: Record<string, number> = {};
    for (const it of items) if (it.score !== null) scores[it.key] = it.score;
    await writeFileAtomic(path.join(runDir, 'scores', `${role}.json`), JSON.stringify(scores, null, 2) + '\n');
  }
}
