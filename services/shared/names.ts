/**
 * Names from users (runs, roles, models) become directory and file names, so they are
 * checked before use: letters, digits, '.', '_' and '-', starting with a letter or digit,
 * at most 128 characters. No separators, no '..', nothing absolute, nothing empty.
 */
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export function nameProblem(value: string): string | undefined {
  if (value === '') return 'is empty';
  if (!NAME.test(value)) return `${JSON.stringify(value)} may hold only letters, digits, '.', '_' and '-', start with a letter or digit, and have at most 128 characters`;
  if (value.includes('..')) return `${JSON.stringify(value)} must not contain '..'`;
  return undefined;
}

export function isSafeName(value: string): boolean {
  return nameProblem(value) === undefined;
}

/** The reference's rule: a role whose name contains "default" holds neutral prompts and is not judged. */
export function isDefaultRole(role: string): boolean {
  return role.includes('default');
}

/** Item key inside its role, as the reference writes it in scores/<role>.json. */
export function itemKey(promptIndex: number, questionIndex: number): string {
  return `pos_p${promptIndex}_q${questionIndex}`;
}

const FAMILIES = [['gemma', 'Gemma'], ['qwen', 'Qwen'], ['llama', 'Llama']] as const;

/**
 * What replaces {model_name} in instructions: the family of a known model, by its name or else
 * by its architecture (config.json's model_type: a checkpoint whose directory is called
 * "checkpoint" is still a Gemma); only then the name's first word, which `guessed` flags.
 */
export function modelShortNameOf(model: string, architecture = ''): { shortName: string; guessed: boolean } {
  for (const text of [model, architecture]) {
    const lower = text.toLowerCase();
    for (const [needle, short] of FAMILIES) if (lower.includes(needle)) return { shortName: short, guessed: false };
  }
  const base = model.split('/').pop() ?? model;
  const first = base.split(/[-_.\s]/).find((s) => s.length > 0) ?? base;
  return { shortName: first.charAt(0).toUpperCase() + first.slice(1), guessed: true };
}

export function modelShortName(model: string, architecture = ''): string {
  return modelShortNameOf(model, architecture).shortName;
}
