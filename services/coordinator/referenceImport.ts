import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import type { ChatMessage } from '../../gen/assistant_axis/v1/common';
import { isDefaultRole, isSafeName, itemKey } from '../shared/names';
import { buildConversation } from './conversation';
import type { DataSet } from './data';

/** One item of a reference run being imported: its answer, and its score when the run had one. */
export interface ImportedItem {
  role: string;
  p: number;
  q: number;
  key: string;
  text: string;
  score?: number;
}

export class ImportError extends Error {}

/** The roles a reference run directory has answers for (`responses/<role>.jsonl`). */
export async function importedRoles(importDir: string): Promise<string[]> {
  let files: string[];
  try {
    files = await fs.readdir(path.join(importDir, 'responses'));
  } catch {
    throw new ImportError(`import_dir: ${importDir} has no responses/ directory (a reference run's output directory holds responses/<role>.jsonl)`);
  }
  const roles = files.filter((f) => f.endsWith('.jsonl')).map((f) => f.slice(0, -'.jsonl'.length));
  const bad = roles.find((r) => !isSafeName(r));
  if (bad !== undefined) throw new ImportError(`import_dir: responses/${bad}.jsonl: ${JSON.stringify(bad)} is not a valid role name`);
  if (roles.length === 0) throw new ImportError(`import_dir: ${path.join(importDir, 'responses')} holds no <role>.jsonl file`);
  return roles.sort();
}

/**
 * Reads a reference run's `responses/<role>.jsonl` (and `scores/<role>.json`, when present)
 * for the roles of the data set. Each line must be an item of the data set whose conversation
 * is the one this data set and model give (so a wrong data_dir or model is caught before any
 * work), answered by the assistant; each item appears once. Errors name the file and line.
 */
export async function readImport(importDir: string, data: DataSet, model: { shortName: string; supportsSystemPrompt: boolean }): Promise<ImportedItem[]> {
  const out: ImportedItem[] = [];
  for (const role of data.roles) {
    const file = path.join(importDir, 'responses', `${role.name}.jsonl`);
    const rel = path.join('responses', `${role.name}.jsonl`);
    let raw: string;
    try {
      raw = await fs.readFile(file, 'utf8');
    } catch {
      throw new ImportError(`import_dir: ${rel} is missing (role ${role.name} is part of the run)`);
    }
    let scores: Record<string, unknown> = {};
    if (!isDefaultRole(role.name)) {
      const scoreFile = path.join(importDir, 'scores', `${role.name}.json`);
      const scoreRaw = await fs.readFile(scoreFile, 'utf8').catch(() => undefined);
      if (scoreRaw !== undefined) {
        try {
          scores = JSON.parse(scoreRaw) as Record<string, unknown>;
        } catch (err) {
          throw new ImportError(`import_dir: scores/${role.name}.json: not valid JSON (${(err as Error).message})`);
        }
        if (typeof scores !== 'object' || scores === null || Array.isArray(scores)) throw new ImportError(`import_dir: scores/${role.name}.json: must be an object {key: score}`);
      }
    }
    const seen = new Set<string>();
    const lines = raw.split('\n');
    for (let i = 0; i < lines.length; i++) {
      if (!lines[i].trim()) continue;
      const where = `import_dir: ${rel} line ${i + 1}`;
      let rec: { prompt_index?: unknown; question_index?: unknown; conversation?: unknown };
      try {
        rec = JSON.parse(lines[i]);
      } catch (err) {
        throw new ImportError(`${where}: not valid JSON (${(err as Error).message})`);
      }
      const p = rec.prompt_index;
      const q = rec.question_index;
      if (!(Number.isInteger(p) && (p as number) >= 0 && (p as number) < role.instructions.length)) throw new ImportError(`${where}: prompt_index must be 0..${role.instructions.length - 1}, got ${JSON.stringify(p)}`);
      if (!(Number.isInteger(q) && (q as number) >= 0 && (q as number) < data.questions.length)) throw new ImportError(`${where}: question_index must be 0..${data.questions.length - 1} (question_count ${data.questions.length}), got ${JSON.stringify(q)}`);
      const conversation = rec.conversation as ChatMessage[] | undefined;
      if (!Array.isArray(conversation) || conversation.length < 2 || conversation.some((m) => typeof m?.role !== 'string' || typeof m?.content !== 'string')) {
        throw new ImportError(`${where}: conversation must be a list of {role, content} messages ending with the assistant's answer`);
      }
      const answer = conversation[conversation.length - 1];
      if (answer.role !== 'assistant') throw new ImportError(`${where}: the conversation's last message must be the assistant's answer, got role ${JSON.stringify(answer.role)}`);
      const expected = buildConversation(role.instructions[p as number], data.questions[q as number].question, model).messages;
      const given = conversation.slice(0, -1).map((m) => ({ role: m.role, content: m.content }));
      if (JSON.stringify(given) !== JSON.stringify(expected)) {
        throw new ImportError(`${where}: the conversation is not the one data_dir and the model give for prompt ${p}, question ${q} (another data set, or a model whose chat template treats the system prompt differently?)`);
      }
      const key = itemKey(p as number, q as number);
      if (seen.has(key)) throw new ImportError(`${where}: item ${key} appears twice`);
      seen.add(key);
      const item: ImportedItem = { role: role.name, p: p as number, q: q as number, key, text: answer.content };
      if (key in scores) {
        const s = scores[key];
        if (!(Number.isInteger(s) && (s as number) >= 0 && (s as number) <= 3)) throw new ImportError(`import_dir: scores/${role.name}.json: ${key} must be a score 0..3, got ${JSON.stringify(s)}`);
        item.score = s as number;
      }
      out.push(item);
    }
  }
  return out;
}
