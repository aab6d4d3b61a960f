import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { invalidArgument } from '../shared/rpc';
import { isDefaultRole, nameProblem } from '../shared/names';

/** A role as the reference defines it: `roles/instructions/<role>.json`. */
export interface Role {
  name: string;
  instructions: string[];
  /** Absent only for default roles, which are not judged. */
  evalPrompt?: string;
}

export interface Question {
  question: string;
  id: number;
}

export interface DataSet {
  dir: string;
  roles: Role[];
  questions: Question[];
  /** sha256 over the chosen roles' files and the questions used: goes into the manifest. */
  hash: string;
}

export const ROLES_SUBDIR = path.join('roles', 'instructions');
export const QUESTIONS_FILE = 'extraction_questions.jsonl';

/**
 * Loads and checks a data set in the reference layout. Every problem is an INVALID_ARGUMENT
 * that names the request field or the file at fault; nothing is written here.
 */
export async function loadDataSet(dir: string, roleNames: string[], questionCount?: number): Promise<DataSet> {
  const rolesDir = path.join(dir, ROLES_SUBDIR);
  let files: string[];
  try {
    files = (await fs.readdir(rolesDir)).filter((f) => f.endsWith('.json')).sort();
  } catch (err) {
    throw invalidArgument(`data_dir: cannot read ${rolesDir}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  const available = files.map((f) => f.slice(0, -'.json'.length));
  let chosen: string[];
  if (roleNames.length === 0) {
    chosen = available.filter((r) => !nameProblem(r));
  } else {
    const seen = new Set<string>();
    for (const r of roleNames) {
      const problem = nameProblem(r);
      if (problem) throw invalidArgument(`roles: role name ${problem}`);
      if (seen.has(r)) throw invalidArgument(`roles: ${JSON.stringify(r)} is listed twice`);
      seen.add(r);
      if (!available.includes(r)) throw invalidArgument(`roles: unknown role ${JSON.stringify(r)} (no ${r}.json in ${rolesDir})`);
    }
    chosen = [...roleNames];
  }
  if (chosen.length === 0) throw invalidArgument(`data_dir: no role files in ${rolesDir}`);

  const hash = createHash('sha256');
  const roles: Role[] = [];
  for (const name of chosen) {
    const file = path.join(rolesDir, `${name}.json`);
    const raw = await readText(file);
    hash.update(`${name}\0`).update(raw).update('\0');
    roles.push(parseRole(name, raw, file));
  }

  const qFile = path.join(dir, QUESTIONS_FILE);
  const qRaw = await readText(qFile);
  const questions: Question[] = [];
  qRaw.split('\n').forEach((line, i) => {
    if (!line.trim()) return;
    let q: unknown;
    try {
      q = JSON.parse(line);
    } catch {
      throw invalidArgument(`${qFile}: line ${i + 1} is not valid JSON`);
    }
    const question = (q as { question?: unknown }).question;
    if (typeof question !== 'string' || !question) throw invalidArgument(`${qFile}: line ${i + 1} lacks a "question" string`);
    const id = (q as { id?: unknown }).id;
    questions.push({ question, id: typeof id === 'number' ? id : questions.length });
  });
  questionCount ??= questions.length;
  if (!Number.isInteger(questionCount) || questionCount < 1) throw invalidArgument(`question_count: must be at least 1, got ${questionCount}`);
  if (questionCount > questions.length) throw invalidArgument(`question_count: ${questionCount} is more than the ${questions.length} questions in ${qFile}`);
  const used = questions.slice(0, questionCount);
  hash.update(JSON.stringify(used));
  return { dir, roles, questions: used, hash: hash.digest('hex') };
}

export function parseRole(name: string, raw: string, file: string): Role {
  let json: any;
  try {
    json = JSON.parse(raw);
  } catch (err) {
    throw invalidArgument(`${file}: not valid JSON (${(err as Error).message})`);
  }
  if (!json || typeof json !== 'object' || !Array.isArray(json.instruction) || json.instruction.length === 0) {
    throw invalidArgument(`${file}: needs a non-empty "instruction" list`);
  }
  const instructions = json.instruction.map((it: any, i: number) => {
    if (!it || typeof it.pos !== 'string') throw invalidArgument(`${file}: instruction[${i}] needs a "pos" string`);
    return it.pos as string;
  });
  const isDefault = isDefaultRole(name);
  if (!isDefault && (typeof json.eval_prompt !== 'string' || !json.eval_prompt)) {
    throw invalidArgument(`${file}: a non-default role needs an "eval_prompt" string`);
  }
  return { name, instructions, evalPrompt: isDefault ? undefined : json.eval_prompt };
}

async function readText(file: string): Promise<string> {
  try {
    return await fs.readFile(file, 'utf8');
  } catch (err) {
    throw invalidArgument(`${file}: cannot read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
}
