import * as fs from 'node:fs';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { Ledger, LedgerDamaged } from '../../services/coordinator/ledger';
import { DONE, RunSpec } from '../../services/coordinator/ledgerRows';
import { LEDGER_VERSION } from '../../services/coordinator/ledgerSchema';
import { NewerFormat } from '../../services/shared/formatVersion';
import { tempDir } from '../kit/files';

const spec = (name: string): RunSpec => ({
  name,
  model: 'm',
  dataDir: '/data',
  roles: ['chef', 'default', 'poet'],
  questionCount: 40,
  minCount: 1,
  temperature: 0.7,
  topP: 0.9,
  maxNewTokens: 8,
  maxContext: 64,
  seed: 0,
  layers: [],
  dataHash: 'h',
});

describe('the ledger reads a run a page at a time', () => {
  const ledger = new Ledger(path.join(tempDir('ledger'), 'state'));
  const items = ['chef', 'default', 'poet'].flatMap((role) => Array.from({ length: 5 * 40 }, (_, i) => ({ role, p: Math.floor(i / 40), q: i % 40, key: `pos_p${Math.floor(i / 40)}_q${i % 40}` })));
  ledger.createRun(spec('paged'), items, new Date().toISOString());

  it('pages cover every item once, in (role, prompt, question) order, without the text', () => {
    ledger.saveText('paged', 'chef', 'pos_p0_q1', { text: 'an answer', promptTokens: 1, completionTokens: 2, finishReason: 'stop' });
    const seen = [...ledger.itemPages('paged', '1', 37)];
    expect(seen).toHaveLength(600);
    expect(seen.map((i) => `${i.role}/${i.key}`)).toEqual(items.map((i) => `${i.role}/${i.key}`));
    const answered = seen.find((i) => i.role === 'chef' && i.key === 'pos_p0_q1')!;
    expect(answered).toMatchObject({ hasText: true, text: null });
    expect(ledger.itemText('paged', 'chef', 'pos_p0_q1')).toBe('an answer');
  });

  it('a filter is applied page by page, also when rows change between pages', () => {
    // Default items are done once their activation is acknowledged; judged roles need the score too.
    for (let q = 0; q < 40; q++) ledger.ackActivation('paged', 'default', `pos_p0_q${q}`);
    ledger.ackActivation('paged', 'chef', 'pos_p0_q0');
    const pending = ledger.itemPages('paged', `NOT (${DONE})`, 50);
    const first = pending.next().value!;
    expect(first).toMatchObject({ role: 'chef', key: 'pos_p0_q0' });
    // Done while the pages are being read: later pages no longer hold it.
    ledger.ackActivation('paged', 'default', 'pos_p1_q0');
    const rest = [first, ...pending];
    expect(rest).toHaveLength(600 - 40 - 1);
    expect(rest.some((i) => i.role === 'default' && i.key === 'pos_p1_q0')).toBe(false);
  });

  it('counts per role by SQL', () => {
    const counts = Object.fromEntries(ledger.roleCounts('paged').map((c) => [c.role, c]));
    expect(counts.default).toMatchObject({ total: 200, done: 41, generated: 0 });
    expect(counts.chef).toMatchObject({ total: 200, done: 0, generated: 1, judged: 0 });
  });
});

describe('the ledger commits the item steps of one turn of the event loop together', () => {
  const dir = path.join(tempDir('ledger-turns'), 'state');
  const ledger = new Ledger(dir);
  ledger.createRun(spec('turns'), [0, 1, 2].map((q) => ({ role: 'chef', p: 0, q, key: `pos_p0_q${q}` })), new Date().toISOString());
  // A second connection sees only what is committed, as a restarted coordinator would.
  const outside = () => new Database(path.join(dir, 'ledger.sqlite'), { readonly: true });
  const texts = () => {
    const db = outside();
    try {
      return (db.prepare("SELECT COUNT(*) AS n FROM items WHERE run = 'turns' AND text IS NOT NULL").get() as { n: number }).n;
    } finally {
      db.close();
    }
  };
  const answer = { text: 'a', promptTokens: 1, completionTokens: 1, finishReason: 'stop' };

  it('holds the steps until the turn ends; committed() resolves once they are durable', async () => {
    ledger.saveText('turns', 'chef', 'pos_p0_q0', answer);
    ledger.saveText('turns', 'chef', 'pos_p0_q1', answer);
    expect(ledger.itemText('turns', 'chef', 'pos_p0_q0')).toBe('a'); // its own reads see them at once
    expect(texts()).toBe(0);
    await ledger.committed();
    expect(texts()).toBe(2);
  });

  it('commits the pending steps before a write that must not wait, and before a role\'s items are read for its files', async () => {
    ledger.saveText('turns', 'chef', 'pos_p0_q2', answer);
    expect(texts()).toBe(2);
    ledger.addJudgeSubmission('turns', 'k1', ['turns/chef/pos_p0_q2']);
    expect(texts()).toBe(3);
    ledger.ackActivation('turns', 'chef', 'pos_p0_q2');
    ledger.roleItems('turns', 'chef');
    const db = outside();
    expect((db.prepare("SELECT activation_acked FROM items WHERE key = 'pos_p0_q2'").get() as { activation_acked: number }).activation_acked).toBe(1);
    db.close();
    ledger.close();
  });
});

describe('a damaged ledger', () => {
  it('is refused at start with what to do, not read as if it were whole', () => {
    const dir = path.join(tempDir('ledger-damaged'), 'state');
    const ledger = new Ledger(dir);
    const items = Array.from({ length: 400 }, (_, i) => ({ role: 'chef', p: 0, q: i, key: `pos_p0_q${i}` }));
    ledger.createRun(spec('hurt'), items, new Date().toISOString());
    ledger.close();
    // A page in the middle of the file overwritten (a bad sector, a copy cut short), the header left whole.
    const file = path.join(dir, 'ledger.sqlite');
    const bytes = fs.readFileSync(file);
    const pageSize = bytes.readUInt16BE(16);
    expect(bytes.length).toBeGreaterThan(4 * pageSize);
    bytes.fill(0xa5, 2 * pageSize, 3 * pageSize);
    fs.writeFileSync(file, bytes);
    expect(() => new Ledger(dir)).toThrow(LedgerDamaged);
    expect(() => new Ledger(dir)).toThrow(/ledger\.sqlite is damaged \(.+\): the coordinator cannot trust what it says was done\. Move it aside/);
  });
});

describe('the ledger\'s format version', () => {
  it('brings a ledger from before versions up to this one, items intact, and refuses one from a newer release', () => {
    const dir = path.join(tempDir('ledger-version'), 'state');
    fs.mkdirSync(dir, { recursive: true });
    const file = path.join(dir, 'ledger.sqlite');
    // A ledger as the first releases wrote it: no user_version, items without the later columns.
    const old = new Database(file);
    old.exec(`CREATE TABLE runs (name TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, created_at TEXT NOT NULL,
        finished_at TEXT NOT NULL DEFAULT '', error TEXT NOT NULL DEFAULT '', backend TEXT NOT NULL DEFAULT '', judge TEXT NOT NULL DEFAULT '', summary TEXT);
      CREATE TABLE items (run TEXT NOT NULL, role TEXT NOT NULL, p INTEGER NOT NULL, q INTEGER NOT NULL, key TEXT NOT NULL,
        text TEXT, prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
        finish_reason TEXT NOT NULL DEFAULT '', activation_acked INTEGER NOT NULL DEFAULT 0,
        judged INTEGER NOT NULL DEFAULT 0, score INTEGER, raw_reply TEXT NOT NULL DEFAULT '',
        score_acked INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (run, role, key));`);
    old.prepare('INSERT INTO runs (name, spec, state, created_at) VALUES (?, ?, ?, ?)').run('old', JSON.stringify(spec('old')), 'RUNNING', '2026-01-01T00:00:00Z');
    old.prepare('INSERT INTO items (run, role, p, q, key, text, activation_acked) VALUES (?, ?, ?, ?, ?, ?, ?)').run('old', 'chef', 0, 0, 'pos_p0_q0', 'kept text', 1);
    old.prepare('INSERT INTO items (run, role, p, q, key) VALUES (?, ?, ?, ?, ?)').run('old', 'chef', 0, 1, 'pos_p0_q1');
    expect(old.pragma('user_version', { simple: true })).toBe(0);
    old.close();

    const ledger = new Ledger(dir);
    expect(ledger.getRun('old')?.state).toBe('RUNNING');
    expect(ledger.itemText('old', 'chef', 'pos_p0_q0')).toBe('kept text');
    expect(ledger.item('old', 'chef', 'pos_p0_q0')).toMatchObject({ activationAcked: true, judgeUsage: { attempts: 0 } });
    expect(ledger.item('old', 'chef', 'pos_p0_q1')).toMatchObject({ hasText: false, activationAcked: false });
    ledger.close();
    const check = new Database(file);
    expect(check.pragma('user_version', { simple: true })).toBe(LEDGER_VERSION);
    // Written by a release after this one: refused, saying so, and left as it was.
    check.pragma(`user_version = ${LEDGER_VERSION + 1}`);
    check.close();
    expect(() => new Ledger(dir)).toThrow(NewerFormat);
    expect(() => new Ledger(dir)).toThrow(new RegExp(`ledger\\.sqlite: the ledger is in format version ${LEDGER_VERSION + 1}, written by a newer release; this one reads up to version ${LEDGER_VERSION}\\. Run the newer release again, or restore a copy`));
    const after = new Database(file);
    expect(after.pragma('user_version', { simple: true })).toBe(LEDGER_VERSION + 1);
    after.close();
  });
});
