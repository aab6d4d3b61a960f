import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

/** A new empty directory under the system's temporary directory, named `axis-<prefix>-…`. */
export function tempDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `axis-${prefix}-`));
}

/** A judge price file (USD per million tokens, by model) in a new temporary directory; returns its path. */
export function priceFile(prices: Record<string, { prompt: number; completion: number }>): string {
  const file = path.join(tempDir('prices'), 'prices.json');
  fs.writeFileSync(file, JSON.stringify(prices));
  return file;
}
