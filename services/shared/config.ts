import { parseArgs } from 'node:util';

/**
 * One option of a service: a flag `--name`, an environment variable, a default and a line
 * of help. Flags win over the environment, which wins over the default.
 */
export interface OptionSpec {
  type: 'string' | 'number' | 'boolean';
  env: string;
  default: string | number | boolean;
  help: string;
}

export type OptionTable = Record<string, OptionSpec>;

type ValueOf<S extends OptionSpec> = S['type'] extends 'number' ? number : S['type'] extends 'boolean' ? boolean : string;
export type Config<T extends OptionTable> = { [K in keyof T]: ValueOf<T[K]> };

export class ConfigError extends Error {}

export function helpText(service: string, table: OptionTable): string {
  const lines = [`usage: ${service} [options]`, ''];
  for (const [name, spec] of Object.entries(table)) {
    lines.push(`  --${name.padEnd(22)} ${spec.help} (env ${spec.env}, default ${JSON.stringify(spec.default)})`);
  }
  return lines.join('\n');
}

export function loadConfig<T extends OptionTable>(
  service: string,
  table: T,
  argv: string[] = process.argv.slice(2),
  env: NodeJS.ProcessEnv = process.env,
): Config<T> {
  const options: Record<string, { type: 'string' | 'boolean' }> = { help: { type: 'boolean' } };
  for (const [name, spec] of Object.entries(table)) options[name] = { type: spec.type === 'boolean' ? 'boolean' : 'string' };
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options, strict: true, allowPositionals: false });
  } catch (err) {
    throw new ConfigError(`${(err as Error).message}\n\n${helpText(service, table)}`);
  }
  if (parsed.values.help) {
    process.stdout.write(helpText(service, table) + '\n');
    process.exit(0);
  }
  const out: Record<string, unknown> = {};
  for (const [name, spec] of Object.entries(table)) {
    const raw = parsed.values[name] ?? env[spec.env];
    if (raw === undefined || raw === '') {
      out[name] = spec.default;
      continue;
    }
    if (spec.type === 'number') {
      const n = Number(raw);
      if (!Number.isFinite(n)) throw new ConfigError(`--${name} (${spec.env}) must be a number, got ${JSON.stringify(raw)}`);
      out[name] = n;
    } else if (spec.type === 'boolean') {
      out[name] = raw === true || raw === 'true' || raw === '1';
    } else {
      out[name] = String(raw);
    }
  }
  return out as Config<T>;
}
