import Database from 'better-sqlite3';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { checkFormatVersion } from '../shared/formatVersion';
import { ADDED_ITEM_COLUMNS, LEDGER_SCHEMA, LEDGER_VERSION } from './ledgerSchema';
import { DONE, ITEM_COLUMNS_WITHOUT_TEXT, JudgeBatchRow, JudgeUsage, RoleCounts, RunRow, RunSpec, RunStateName, ItemRow, toItemRow, toRunRow } from './ledgerRows';

/**
 * The coordinator's durable record of every run and item (SQLite, WAL, synchronous=NORMAL: a
 * committed step survives kill -9; a power loss may drop the last commits, which are redone
 * safely; its format is LEDGER_VERSION, in SQLite's user_version). An item moves: text saved -> activation
 * acknowledged by aggregation -> judged -> score acknowledged; a restart resumes each item
 * at its first missing step.
 */
/** The ledger's file fails SQLite's check: the message says what to do. */
export class LedgerDamaged extends Error {}

export class Ledger {
  private readonly db: Database.Database;
  /** Prepared once each: preparing (parsing the SQL) at every item step cost more than running it. */
  private readonly statements = new Map<string, Database.Statement>();

  private sql(text: string): Database.Statement {
    let statement = this.statements.get(text);
    if (!statement) this.statements.set(text, (statement = this.db.prepare(text)));
    return statement;
  }

  /** The open transaction of this turn's item steps, committed when the turn ends (see itemStep). */
  private turn: { done: Promise<void>; resolve: () => void; reject: (err: unknown) => void } | undefined;
  /** A commit that failed: every later write fails with it (the steps it held were rolled back). */
  private failed: Error | undefined;

  /**
   * The per-item steps (a text saved, acknowledgements) written in one turn of the event loop
   * share one commit, made when the turn ends: at a couple of hundred items a second, one commit
   * per step was most of the ledger's cost. A message that depends on a step (an activation
   * after its text) is sent only once `committed()` resolves, so a crash never leaves
   * aggregation holding what the ledger lost; steps lost with a crash are done again (the same
   * seed gives the same text). Every other write, a judge's answer included (it is paid for),
   * commits the pending steps first, then itself.
   */
  private itemStep(write: () => void): void {
    if (this.failed) throw this.failed;
    if (!this.turn) {
      this.db.exec('BEGIN');
      let resolve!: () => void;
      let reject!: (err: unknown) => void;
      const done = new Promise<void>((res, rej) => ((resolve = res), (reject = rej)));
      done.catch(() => undefined); // seen by whoever awaits committed(); the next write throws it
      this.turn = { done, resolve, reject };
      setImmediate(() => this.commitSteps());
    }
    write();
  }

  /** Commits the item steps written so far (now, or at the end of the turn when they were written). */
  private commitSteps(): void {
    const turn = this.turn;
    if (!turn) return;
    this.turn = undefined;
    try {
      this.db.exec('COMMIT');
      turn.resolve();
    } catch (err) {
      this.failed = new Error(`the ledger could not commit: ${(err as Error).message}`);
      try {
        this.db.exec('ROLLBACK');
      } catch {
        // Already rolled back by SQLite.
      }
      turn.reject(this.failed);
    }
  }

  /** Resolves once every item step written so far is committed. */
  committed(): Promise<void> {
    if (this.failed) return Promise.reject(this.failed);
    return this.turn?.done ?? Promise.resolve();
  }

  /** A write that must not wait: the pending steps are committed first, then it commits alone. */
  private now<T>(write: () => T): T {
    this.commitSteps();
    if (this.failed) throw this.failed;
    return write();
  }

  constructor(stateDir: string) {
    fs.mkdirSync(stateDir, { recursive: true });
    const file = path.join(stateDir, 'ledger.sqlite');
    let db: Database.Database | undefined;
    try {
      db = new Database(file);
      // A ledger damaged on disk (a bad sector, a copy cut short) is found now, with what to do,
      // not later as a crash in the middle of a run, restarted again and again.
      const check = (db.pragma('quick_check', { simple: false }) as { quick_check: string }[]).map((r) => r.quick_check);
      if (check.join() !== 'ok') throw new Error(check.slice(0, 3).join('; '));
    } catch (err) {
      db?.close();
      throw new LedgerDamaged(`${file} is damaged (${(err as Error).message.replace(/\s*\n\s*/g, ' ')}): the coordinator cannot trust what it says was done. Move it aside (with its -wal and -shm files) and restore a copy, or move it aside and start again: runs are then redone from the start, and aggregation drops what it already holds as duplicates`);
    }
    this.db = db;
    this.db.pragma('journal_mode = WAL');
    // NORMAL in WAL mode: a commit is in the WAL file when it returns, so a killed coordinator
    // loses nothing; only a power loss can drop the last commits before a checkpoint, and every
    // step is redone safely (the same seed gives the same text, aggregation drops duplicates).
    // FULL would fsync the event loop at every item step, which capped a run near 70 items/s.
    this.db.pragma('synchronous = NORMAL');
    const version = this.db.pragma('user_version', { simple: true }) as number;
    try {
      checkFormatVersion('the ledger', file, version, LEDGER_VERSION);
    } catch (err) {
      this.db.close();
      throw err;
    }
    // Older ledgers are brought up to this version in place: tables and columns added since.
    this.db.exec(LEDGER_SCHEMA);
    this.ensureColumns('items', ADDED_ITEM_COLUMNS);
    if (version < LEDGER_VERSION) this.db.pragma(`user_version = ${LEDGER_VERSION}`);
  }

  private ensureColumns(table: string, columns: Record<string, string>): void {
    const have = new Set((this.sql(`PRAGMA table_info(${table})`).all() as { name: string }[]).map((c) => c.name));
    for (const [name, type] of Object.entries(columns)) if (!have.has(name)) this.db.exec(`ALTER TABLE ${table} ADD COLUMN ${name} ${type}`);
  }

  /** Replaces the stored spec (only ADJUSTABLE_SPEC_FIELDS may differ; the caller checks). */
  updateSpec(spec: RunSpec): void {
    this.now(() => {
      this.sql('UPDATE runs SET spec = ? WHERE name = ?').run(JSON.stringify(spec), spec.name);
    });
  }

  close(): void {
    this.commitSteps();
    this.db.close();
  }

  getRun(name: string): RunRow | undefined {
    const r = this.sql('SELECT * FROM runs WHERE name = ?').get(name) as Record<string, any> | undefined;
    return r && toRunRow(r);
  }

  listRuns(): RunRow[] {
    return (this.sql('SELECT * FROM runs ORDER BY created_at').all() as Record<string, any>[]).map(toRunRow);
  }

  /** Creates the run, its roles and all its items in one transaction. */
  /** Items may come with their text (and score) already: an imported run's answers. */
  createRun(spec: RunSpec, items: { role: string; p: number; q: number; key: string; text?: string; score?: number }[], createdAt: string): void {
    this.now(() => {
      const insertRun = this.sql('INSERT INTO runs (name, spec, state, created_at) VALUES (?, ?, ?, ?)');
      const insertRole = this.sql('INSERT OR IGNORE INTO roles (run, role) VALUES (?, ?)');
      const insertItem = this.sql('INSERT OR IGNORE INTO items (run, role, p, q, key, text, finish_reason, judged, score, raw_reply) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)');
      this.db.transaction(() => {
        insertRun.run(spec.name, JSON.stringify(spec), 'PENDING', createdAt);
        for (const role of spec.roles) insertRole.run(spec.name, role);
        for (const it of items) {
          const scored = it.score !== undefined;
          insertItem.run(spec.name, it.role, it.p, it.q, it.key, it.text ?? null, it.text !== undefined ? 'imported' : '', scored ? 1 : 0, scored ? it.score : null, scored ? 'imported' : '');
        }
      })();
    });
  }

  setRunState(name: string, state: RunStateName, fields: { error?: string; finishedAt?: string; summary?: unknown; backend?: string; judge?: string } = {}): void {
    this.now(() => {
      const run = this.getRun(name);
      if (!run) return;
      this
        .sql('UPDATE runs SET state = ?, error = ?, finished_at = ?, summary = ?, backend = ?, judge = ? WHERE name = ?')
        .run(
          state,
          fields.error ?? (state === 'FAILED' ? run.error : ''),
          fields.finishedAt ?? (state === 'SUCCEEDED' || state === 'FAILED' || state === 'CANCELLED' || state === 'PAUSED' ? run.finishedAt : ''),
          fields.summary !== undefined ? JSON.stringify(fields.summary) : run.summary === undefined ? null : JSON.stringify(run.summary),
          fields.backend ?? run.backend,
          fields.judge ?? run.judge,
          name,
        );
    });
  }

  /** Removes a run and everything of it, in one transaction. */
  deleteRun(name: string): void {
    this.now(() => {
      this.db.transaction(() => {
        for (const table of ['items', 'roles', 'judge_batches', 'judge_submissions']) this.sql(`DELETE FROM ${table} WHERE run = ?`).run(name);
        this.sql('DELETE FROM runs WHERE name = ?').run(name);
      })();
    });
  }

  /** Forgets that aggregation acknowledged anything of this run (its state was lost): everything is sent again. */
  resetAcks(name: string): void {
    this.now(() => {
      this.sql('UPDATE items SET activation_acked = 0, score_acked = 0 WHERE run = ?').run(name);
    });
  }

  countActivationsAcked(run: string): number {
    return (this.sql('SELECT COUNT(*) AS n FROM items WHERE run = ? AND activation_acked = 1').get(run) as { n: number }).n;
  }

  /**
   * The run's items in (role, p, q) order, a page at a time and without their text, so that the
   * coordinator's memory does not grow with the run: `where` picks them (SQL over the items
   * table's columns). A page is read when the one before is used up.
   */
  *itemPages(run: string, where = '1', pageSize = 1000): Generator<ItemRow> {
    const page = this.sql(
      `SELECT ${ITEM_COLUMNS_WITHOUT_TEXT} FROM items WHERE run = ? AND (${where}) AND (role, p, q) > (?, ?, ?) ORDER BY role, p, q LIMIT ?`,
    );
    let after: [string, number, number] = ['', -1, -1];
    for (;;) {
      const rows = (page.all(run, ...after, pageSize) as Record<string, any>[]).map(toItemRow);
      yield* rows;
      if (rows.length < pageSize) return;
      const last = rows[rows.length - 1];
      after = [last.role, last.promptIndex, last.questionIndex];
    }
  }

  /** One item, without its text. */
  item(run: string, role: string, key: string): ItemRow | undefined {
    const row = this.sql(`SELECT ${ITEM_COLUMNS_WITHOUT_TEXT} FROM items WHERE run = ? AND role = ? AND key = ?`).get(run, role, key) as Record<string, any> | undefined;
    return row ? toItemRow(row) : undefined;
  }

  itemText(run: string, role: string, key: string): string | null {
    return (this.sql('SELECT text FROM items WHERE run = ? AND role = ? AND key = ?').get(run, role, key) as { text: string | null } | undefined)?.text ?? null;
  }

  /** Counts per role (items, generated, judged, unscored, done) and judge usage totals, by SQL. */
  roleCounts(run: string): RoleCounts[] {
    return (
      this
        .sql(
          `SELECT role, COUNT(*) AS total, SUM(text IS NOT NULL) AS generated, SUM(judged) AS judged, SUM(judged AND score IS NULL) AS unscored,
             SUM(${DONE}) AS done, SUM(judge_attempts) AS attempts, SUM(judge_prompt_tokens) AS prompt_tokens,
             SUM(judge_completion_tokens) AS completion_tokens, SUM(judge_cost_usd) AS cost_usd, SUM(judge_possibly_billed_tokens) AS possibly_billed, SUM(recovered) AS recovered
           FROM items WHERE run = ? GROUP BY role ORDER BY role`,
        )
        .all(run) as Record<string, number & string>[]
    ).map((r) => ({
      role: r.role,
      total: r.total,
      generated: r.generated,
      judged: r.judged,
      unscored: r.unscored,
      done: r.done,
      recovered: r.recovered,
      usage: { attempts: r.attempts, promptTokens: r.prompt_tokens, completionTokens: r.completion_tokens, costUsd: r.cost_usd, possiblyBilledTokens: r.possibly_billed },
    }));
  }

  /** A role's items in order, for its files: what is written from them is committed first. */
  roleItems(run: string, role: string): ItemRow[] {
    this.commitSteps();
    return (this.sql('SELECT * FROM items WHERE run = ? AND role = ? ORDER BY p, q').all(run, role) as Record<string, any>[]).map(toItemRow);
  }

  saveText(run: string, role: string, key: string, r: { text: string; promptTokens: number; completionTokens: number; finishReason: string; responseTokenIds?: number[] }): void {
    this.itemStep(() => {
      const ids = r.responseTokenIds?.length ? Buffer.from(Uint32Array.from(r.responseTokenIds).buffer) : null;
      this
        .sql('UPDATE items SET text = ?, prompt_tokens = ?, completion_tokens = ?, finish_reason = ?, response_ids = ? WHERE run = ? AND role = ? AND key = ?')
        .run(r.text, r.promptTokens, r.completionTokens, r.finishReason, ids, run, role, key);
    });
  }

  /** The answer's sampled token ids, when the backend reported them (read only to recover an activation). */
  responseIds(run: string, role: string, key: string): number[] {
    const row = this.sql('SELECT response_ids FROM items WHERE run = ? AND role = ? AND key = ?').get(run, role, key) as { response_ids: Buffer | null } | undefined;
    const blob = row?.response_ids;
    if (!blob || blob.length % 4) return [];
    return Array.from(new Uint32Array(blob.buffer.slice(blob.byteOffset, blob.byteOffset + blob.length)));
  }

  markRecovered(run: string, role: string, key: string): void {
    this.itemStep(() => {
      this.sql('UPDATE items SET recovered = recovered + 1 WHERE run = ? AND role = ? AND key = ?').run(run, role, key);
    });
  }

  ackActivation(run: string, role: string, key: string): void {
    this.itemStep(() => {
      this.sql('UPDATE items SET activation_acked = 1 WHERE run = ? AND role = ? AND key = ?').run(run, role, key);
    });
  }

  saveScore(run: string, role: string, key: string, score: number | null, rawReply: string, usage: JudgeUsage): void {
    this.now(() => {
      this
        .sql(
          `UPDATE items SET judged = 1, score = ?, raw_reply = ?, judge_attempts = judge_attempts + ?, judge_prompt_tokens = judge_prompt_tokens + ?,
           judge_completion_tokens = judge_completion_tokens + ?, judge_cost_usd = judge_cost_usd + ?, judge_possibly_billed_tokens = judge_possibly_billed_tokens + ?
           WHERE run = ? AND role = ? AND key = ?`,
        )
        .run(score, rawReply, usage.attempts, usage.promptTokens, usage.completionTokens, usage.costUsd, usage.possiblyBilledTokens, run, role, key);
    });
  }

  /** Judge spending on an item whose scoring failed (the calls were still made and may be billed). */
  addJudgeUsage(run: string, role: string, key: string, usage: JudgeUsage): void {
    this.now(() => {
      this
        .sql(
          `UPDATE items SET judge_attempts = judge_attempts + ?, judge_prompt_tokens = judge_prompt_tokens + ?, judge_completion_tokens = judge_completion_tokens + ?,
           judge_cost_usd = judge_cost_usd + ?, judge_possibly_billed_tokens = judge_possibly_billed_tokens + ? WHERE run = ? AND role = ? AND key = ?`,
        )
        .run(usage.attempts, usage.promptTokens, usage.completionTokens, usage.costUsd, usage.possiblyBilledTokens, run, role, key);
    });
  }

  ackScore(run: string, role: string, key: string): void {
    this.itemStep(() => {
      this.sql('UPDATE items SET score_acked = 1 WHERE run = ? AND role = ? AND key = ?').run(run, role, key);
    });
  }

  /** Records a submission before it is sent (see judge_submissions). */
  addJudgeSubmission(run: string, key: string, itemIds: string[]): void {
    this.now(() => {
      this.sql('INSERT INTO judge_submissions (run, submission_key, item_ids, created_at) VALUES (?, ?, ?, ?)').run(run, key, JSON.stringify(itemIds), new Date().toISOString());
    });
  }

  /** Submissions sent without their batch id recorded: a crash or a lost reply. */
  pendingJudgeSubmissions(run: string): { key: string; itemIds: string[] }[] {
    return (this.sql('SELECT submission_key, item_ids FROM judge_submissions WHERE run = ? ORDER BY created_at').all(run) as { submission_key: string; item_ids: string }[]).map((r) => ({ key: r.submission_key, itemIds: JSON.parse(r.item_ids) }));
  }

  /** The batch id of a submission, in one transaction with the end of the submission. */
  addJudgeBatch(run: string, batchId: string, itemIds: string[], submissionKey = ''): void {
    this.now(() => {
      this.db.transaction(() => {
        // Already there: the judge returned the batch of an earlier try of the same submission.
        if (batchId) this.sql('INSERT OR IGNORE INTO judge_batches (run, batch_id, item_ids, created_at) VALUES (?, ?, ?, ?)').run(run, batchId, JSON.stringify(itemIds), new Date().toISOString());
        if (submissionKey) this.sql('DELETE FROM judge_submissions WHERE run = ? AND submission_key = ?').run(run, submissionKey);
      })();
    });
  }

  openJudgeBatches(run: string): JudgeBatchRow[] {
    return (this.sql('SELECT batch_id, item_ids FROM judge_batches WHERE run = ? AND open = 1 ORDER BY created_at').all(run) as { batch_id: string; item_ids: string }[]).map((r) => ({
      batchId: r.batch_id,
      itemIds: JSON.parse(r.item_ids),
    }));
  }

  closeJudgeBatch(run: string, batchId: string): void {
    this.now(() => {
      this.sql('UPDATE judge_batches SET open = 0 WHERE run = ? AND batch_id = ?').run(run, batchId);
    });
  }

  writtenRoles(run: string): Set<string> {
    return new Set((this.sql('SELECT role FROM roles WHERE run = ? AND written = 1').all(run) as { role: string }[]).map((r) => r.role));
  }

  markRoleWritten(run: string, role: string): void {
    this.now(() => {
      this.sql('UPDATE roles SET written = 1 WHERE run = ? AND role = ?').run(run, role);
    });
  }
}
