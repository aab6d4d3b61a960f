/**
 * The ledger's format (SQLite `user_version`): 0 is a ledger from before versions (its tables
 * lack some item columns: added in place); 1 adds nothing else. A newer one is refused.
 */
export const LEDGER_VERSION = 1;

/** The ledger's tables (SQLite). */
export const LEDGER_SCHEMA = `
      CREATE TABLE IF NOT EXISTS runs (
        name TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, created_at TEXT NOT NULL,
        finished_at TEXT NOT NULL DEFAULT '', error TEXT NOT NULL DEFAULT '', backend TEXT NOT NULL DEFAULT '',
        judge TEXT NOT NULL DEFAULT '', summary TEXT);
      CREATE TABLE IF NOT EXISTS items (
        run TEXT NOT NULL, role TEXT NOT NULL, p INTEGER NOT NULL, q INTEGER NOT NULL, key TEXT NOT NULL,
        text TEXT, prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
        finish_reason TEXT NOT NULL DEFAULT '', activation_acked INTEGER NOT NULL DEFAULT 0,
        judged INTEGER NOT NULL DEFAULT 0, score INTEGER, raw_reply TEXT NOT NULL DEFAULT '',
        score_acked INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (run, role, key));
      CREATE TABLE IF NOT EXISTS roles (
        run TEXT NOT NULL, role TEXT NOT NULL, written INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (run, role));
      CREATE TABLE IF NOT EXISTS judge_batches (
        run TEXT NOT NULL, batch_id TEXT NOT NULL, item_ids TEXT NOT NULL, open INTEGER NOT NULL DEFAULT 1,
        created_at TEXT NOT NULL, PRIMARY KEY (run, batch_id));
      -- A batch about to be submitted: kept until its batch id is in judge_batches, so a submission
      -- whose reply was lost is sent again with the same key (the judge returns the batch it made).
      CREATE TABLE IF NOT EXISTS judge_submissions (
        run TEXT NOT NULL, submission_key TEXT NOT NULL, item_ids TEXT NOT NULL, created_at TEXT NOT NULL,
        PRIMARY KEY (run, submission_key));
`;

/** Columns of items added after the first version: added in place to ledgers written before them. */
export const ADDED_ITEM_COLUMNS: Record<string, string> = {
      judge_attempts: 'INTEGER NOT NULL DEFAULT 0',
      judge_prompt_tokens: 'INTEGER NOT NULL DEFAULT 0',
      judge_completion_tokens: 'INTEGER NOT NULL DEFAULT 0',
      judge_cost_usd: 'REAL NOT NULL DEFAULT 0',
      judge_possibly_billed_tokens: 'INTEGER NOT NULL DEFAULT 0',
      // The answer's sampled token ids (uint32 little-endian), for an exact Extract after a lost activation.
      response_ids: 'BLOB',
      // Times the activation was recovered by Extract after a restart (the text was kept).
      recovered: 'INTEGER NOT NULL DEFAULT 0',
};
