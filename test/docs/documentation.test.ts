import * as fs from 'node:fs';
import * as path from 'node:path';
import { configurationMarkdown } from '../../services/cli/configDoc';
import { ROOT } from '../kit/stack';

describe('documentation', () => {
  it('docs/CONFIGURATION.md lists exactly the options the services take (regenerate with `make docs`)', () => {
    expect(fs.readFileSync(path.join(ROOT, 'docs', 'CONFIGURATION.md'), 'utf8')).toBe(configurationMarkdown());
  });

  it('the README starts with the two commands', () => {
    const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
    const firstBlock = readme.slice(readme.indexOf('```'), readme.indexOf('```', readme.indexOf('```') + 3));
    expect(firstBlock).toContain('make demo');
    expect(firstBlock).toContain('make test');
  });
});
