import * as fs from 'node:fs';
import * as path from 'node:path';
import * as ts from 'typescript';

/**
 * The house rules of docs/ARCHITECTURE.md ("Layout"), checked on the import graph as the
 * TypeScript compiler reads it (every static import, re-export, import() and require()):
 * the four services stand side by side and share only the contract, the builder imports no
 * service, and no module of services/ imports itself back through a loop.
 */

const ROOT = path.resolve(__dirname, '..', '..');
const SERVICES = ['inference', 'judge', 'aggregation', 'coordinator'];

/** What each folder of services/ may import besides itself, gen/ and packages. */
const ALLOWED: Record<string, string[]> = {
  shared: [],
  contracts: ['shared'],
  model: ['shared', 'contracts'],
  inference: ['shared', 'contracts'],
  judge: ['shared', 'contracts'],
  aggregation: ['shared', 'contracts'],
  coordinator: ['shared', 'contracts'],
  // The tools (the axis and axis-model commands, the local stack, the demo) put the parts together.
  cli: ['shared', 'contracts', 'model', 'inference', 'judge', 'aggregation', 'coordinator'],
};

function sourceFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    return e.isDirectory() ? sourceFiles(p) : e.name.endsWith('.ts') ? [p] : [];
  });
}

/** Relative imports of a file, resolved to files (a folder import means its index.ts). */
function importsOf(file: string): string[] {
  const info = ts.preProcessFile(fs.readFileSync(file, 'utf8'), true, true);
  return info.importedFiles
    .map((f) => f.fileName)
    .filter((s) => s.startsWith('.'))
    .map((s) => {
      const base = path.resolve(path.dirname(file), s);
      for (const candidate of [`${base}.ts`, path.join(base, 'index.ts'), base]) if (fs.existsSync(candidate) && fs.statSync(candidate).isFile()) return candidate;
      throw new Error(`${path.relative(ROOT, file)} imports ${s}, which resolves to no file`);
    });
}

/** The folder of services/ a file belongs to ('gen' for generated code, '' outside both). */
function folderOf(file: string): string {
  const rel = path.relative(ROOT, file).split(path.sep);
  if (rel[0] === 'gen') return 'gen';
  return rel[0] === 'services' ? rel[1] : '';
}

const files = sourceFiles(path.join(ROOT, 'services'));
const graph = new Map(files.map((f) => [f, importsOf(f)]));

/** Imports that break the folder rules, as "from -> to". */
function forbiddenImports(g: Map<string, string[]>): string[] {
  const broken: string[] = [];
  for (const [file, deps] of g) {
    const from = folderOf(file);
    for (const dep of deps) {
      const to = folderOf(dep);
      if (to === from || to === 'gen') continue;
      if (!ALLOWED[from]?.includes(to)) broken.push(`${path.relative(ROOT, file)} -> ${path.relative(ROOT, dep)}`);
    }
  }
  return broken;
}

/** Import loops: Tarjan's strongly connected components of more than one module (or a module importing itself). */
function importLoops(g: Map<string, string[]>): string[][] {
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const onStack = new Set<string>();
  const stack: string[] = [];
  const loops: string[][] = [];
  let next = 0;
  const visit = (v: string) => {
    index.set(v, next);
    low.set(v, next++);
    stack.push(v);
    onStack.add(v);
    for (const w of g.get(v) ?? []) {
      if (!g.has(w)) continue;
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (onStack.has(w)) low.set(v, Math.min(low.get(v)!, index.get(w)!));
    }
    if (low.get(v) === index.get(v)) {
      const component: string[] = [];
      let w: string;
      do {
        w = stack.pop()!;
        onStack.delete(w);
        component.push(path.relative(ROOT, w));
      } while (w !== v);
      if (component.length > 1 || (g.get(v) ?? []).includes(v)) loops.push(component.sort());
    }
  };
  for (const f of g.keys()) if (!index.has(f)) visit(f);
  return loops;
}

describe('the import rules (docs/ARCHITECTURE.md, "Layout")', () => {
  it('every folder of services/ has a rule', () => {
    const folders = [...new Set(files.map(folderOf))].sort();
    expect(folders).toEqual(Object.keys(ALLOWED).sort());
  });

  it('no service imports another service, the builder imports no service, shared and contracts import no service', () => {
    expect(forbiddenImports(graph)).toEqual([]);
  });

  it('outside inference, the ONNX engine is used through its public entry point only', () => {
    const engine = path.join(ROOT, 'services', 'inference', 'onnx');
    const broken = [...graph].flatMap(([file, deps]) =>
      folderOf(file) === 'inference' ? [] : deps.filter((d) => d.startsWith(engine + path.sep) && d !== path.join(engine, 'index.ts')).map((d) => `${path.relative(ROOT, file)} -> ${path.relative(ROOT, d)}`),
    );
    expect(broken).toEqual([]);
  });

  it('no import loops among the modules of services/', () => {
    expect(importLoops(graph)).toEqual([]);
  });

  it('bench/ takes from test/ only the kit and the doubles, and those two import nothing else of test/', () => {
    const testDir = path.join(ROOT, 'test');
    const shared = [path.join(testDir, 'kit'), path.join(testDir, 'doubles')];
    const isShared = (f: string) => shared.some((dir) => f.startsWith(dir + path.sep));
    const users = [...sourceFiles(path.join(ROOT, 'bench')), ...shared.flatMap(sourceFiles)];
    expect(users.filter(isShared).length).toBeGreaterThanOrEqual(5);
    const broken = users.flatMap((file) => importsOf(file).filter((d) => d.startsWith(testDir + path.sep) && !isShared(d)).map((d) => `${path.relative(ROOT, file)} -> ${path.relative(ROOT, d)}`));
    expect(broken).toEqual([]);
  });

  it('the checks see what they look for (so an empty answer above means something)', () => {
    const f = (...p: string[]) => path.join(ROOT, 'services', ...p);
    // The import this layout removed: the coordinator reading a constant from the judge's folder.
    const planted = new Map([[f('coordinator', 'run.ts'), [f('judge', 'batch.ts'), f('shared', 'names.ts'), f('contracts', 'judge.ts')]]]);
    expect(forbiddenImports(planted)).toEqual(['services/coordinator/run.ts -> services/judge/batch.ts']);
    const loop = new Map([[f('coordinator', 'a.ts'), [f('coordinator', 'b.ts')]], [f('coordinator', 'b.ts'), [f('coordinator', 'c.ts')]], [f('coordinator', 'c.ts'), [f('coordinator', 'a.ts')]], [f('coordinator', 'd.ts'), [f('coordinator', 'a.ts')]]]);
    expect(importLoops(loop)).toEqual([['services/coordinator/a.ts', 'services/coordinator/b.ts', 'services/coordinator/c.ts']]);
    expect(ts.preProcessFile("import { a } from '../judge/prompt';\nexport * from './b';\nconst c = require('./c');\nvoid import('./d');", true, true).importedFiles.map((x) => x.fileName)).toEqual(['../judge/prompt', './b', './c', './d']);
  });
});
