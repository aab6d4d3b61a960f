import * as fs from 'node:fs';
import * as path from 'node:path';
import { buildConversation } from '../../services/coordinator/conversation';
import { loadDataSet, parseRole } from '../../services/coordinator/data';
import { isDefaultRole, modelShortName, modelShortNameOf, nameProblem } from '../../services/shared/names';
import { targetLayer } from '../../services/shared/projection';
import { ROOT, UPSTREAM_DATA } from '../kit/stack';
import { tempDir } from '../kit/files';

describe('the reference data set in ../shared/upstream', () => {
  const dir = path.join(UPSTREAM_DATA, 'roles', 'instructions');
  const files = fs.readdirSync(dir).filter((f) => f.endsWith('.json'));

  it('has 275 roles plus default', () => {
    expect(files.length).toBe(276);
    expect(files).toContain('default.json');
  });

  it('every role file parses, with 5 instructions and an eval prompt for all but default', () => {
    for (const f of files) {
      const name = f.slice(0, -5);
      expect(nameProblem(name)).toBeUndefined();
      const role = parseRole(name, fs.readFileSync(path.join(dir, f), 'utf8'), f);
      expect(role.instructions).toHaveLength(5);
      if (isDefaultRole(name)) expect(role.evalPrompt).toBeUndefined();
      else expect(role.evalPrompt).toMatch(/\{answer\}/);
    }
  });

  it('loads through loadDataSet with all 240 questions', async () => {
    const data = await loadDataSet(UPSTREAM_DATA, ['pirate', 'default'], undefined);
    expect(data.questions).toHaveLength(240);
    expect(data.roles.map((r) => r.name)).toEqual(['pirate', 'default']);
    expect(data.hash).toMatch(/^[0-9a-f]{64}$/);
  });
});

describe('the bundled data set', () => {
  it('has 8 roles, default and 20 questions', async () => {
    const data = await loadDataSet(path.join(ROOT, 'data'), [], undefined);
    expect(data.roles.filter((r) => !isDefaultRole(r.name))).toHaveLength(8);
    expect(data.roles.map((r) => r.name)).toContain('default');
    expect(data.questions).toHaveLength(20);
  });
});

describe('data set errors name the file or field', () => {
  const dir = tempDir('data');
  fs.mkdirSync(path.join(dir, 'roles', 'instructions'), { recursive: true });
  fs.writeFileSync(path.join(dir, 'extraction_questions.jsonl'), '{"question":"a?","id":0}\n{"question":"b?","id":1}\n');
  const write = (name: string, body: string) => fs.writeFileSync(path.join(dir, 'roles', 'instructions', `${name}.json`), body);
  write('ok', JSON.stringify({ instruction: [{ pos: 'x' }], eval_prompt: '{question} {answer}' }));
  write('broken', '{"instruction": [');
  write('noinstr', JSON.stringify({ eval_prompt: 'e' }));
  write('noeval', JSON.stringify({ instruction: [{ pos: 'x' }] }));

  it.each([
    [['broken'], 2, /broken\.json: not valid JSON/],
    [['noinstr'], 2, /noinstr\.json: needs a non-empty "instruction"/],
    [['noeval'], 2, /noeval\.json: a non-default role needs an "eval_prompt"/],
    [['missing'], 2, /roles: unknown role "missing"/],
    [['../ok'], 2, /roles: role name/],
    [['ok'], 3, /question_count: 3 is more than the 2 questions/],
    [['ok'], 0, /question_count: must be at least 1/],
  ])('roles %j, question_count %d', async (roles, count, message) => {
    await expect(loadDataSet(dir, roles as string[], count as number)).rejects.toThrow(message as RegExp);
  });

  it('names data_dir when it cannot be read', async () => {
    await expect(loadDataSet(path.join(dir, 'nope'), [], undefined)).rejects.toThrow(/data_dir: cannot read/);
  });
});

describe('conversations', () => {
  it('puts the instruction in a system message, with {model_name} filled in', () => {
    expect(buildConversation('You are {model_name}.', 'Hi?', { shortName: 'Gemma', supportsSystemPrompt: true }).messages).toEqual([
      { role: 'system', content: 'You are Gemma.' },
      { role: 'user', content: 'Hi?' },
    ]);
    expect(buildConversation('', 'Hi?', { shortName: 'Gemma', supportsSystemPrompt: true }).messages).toEqual([{ role: 'user', content: 'Hi?' }]);
  });

  it('folds the instruction into the user turn when the template has no system role', () => {
    expect(buildConversation('Be a pirate.', 'Hi?', { shortName: 'Gemma', supportsSystemPrompt: false }).messages).toEqual([{ role: 'user', content: 'Be a pirate.\n\nHi?' }]);
    expect(buildConversation('', 'Hi?', { shortName: 'Gemma', supportsSystemPrompt: false }).messages).toEqual([{ role: 'user', content: 'Hi?' }]);
  });

  it('derives the short model name', () => {
    expect(modelShortName('google/gemma-2-27b-it')).toBe('Gemma');
    expect(modelShortName('Qwen/Qwen3-32B')).toBe('Qwen');
    expect(modelShortName('meta-llama/Llama-3.3-70B-Instruct')).toBe('Llama');
    expect(modelShortName('mistralai/Mistral-7B')).toBe('Mistral');
    // A checkpoint in a directory called "checkpoint" is still a Gemma by its config (model_type).
    expect(modelShortNameOf('checkpoint', 'gemma2')).toEqual({ shortName: 'Gemma', guessed: false });
    expect(modelShortNameOf('checkpoint', 'mistral')).toEqual({ shortName: 'Checkpoint', guessed: true });
  });

  it('takes the paper\'s target layers from the architecture and depth, whatever the directory is called', () => {
    // The paper: Gemma 2 27B at layer 22 of 46, Qwen 3 32B at 32 of 64, Llama 3.3 70B at 40 of 80.
    expect(targetLayer('checkpoint', 46, 'gemma2')).toBe(22);
    expect(targetLayer('google/gemma-2-27b-it', 46)).toBe(22);
    expect(targetLayer('checkpoint', 64, 'qwen3')).toBe(32);
    expect(targetLayer('checkpoint', 80, 'llama')).toBe(40);
    // Other models: the middle layer.
    expect(targetLayer('checkpoint', 46, 'llama')).toBe(23);
    expect(targetLayer('tiny', 4, 'gemma2')).toBe(2);
  });

  it('rejects names that would escape a directory', () => {
    for (const bad of ['', '../x', '/abs', 'a/b', '..', 'a..b', '.hidden']) expect(nameProblem(bad)).toBeDefined();
    for (const good of ['pirate', 'gemma-2-27b', 'run_1.v2']) expect(nameProblem(good)).toBeUndefined();
  });
});
