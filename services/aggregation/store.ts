import * as fsSync from 'node:fs';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { IngestRequest } from '../../gen/assistant_axis/v1/aggregation';
import { receivedBytes } from '../shared/bulkWire';
import { mkdirDurable, writeFileAtomic } from '../shared/files';
import { checkFormatVersion } from '../shared/formatVersion';
import { ALL_FINITE, inspectTensor } from '../shared/tensor';
import { Accumulators, Bucket, IngestError, IngestOutcome, KEY_BYTES, RestoredRun, RunAccumulator, RunCounters, WaitingEntry } from './accumulator';
import { Journal, RecordRef } from './journal';

interface BucketEntry {
  count: number;
  file: string;
}

/** A run in a manifest: its counters, the files holding its keys and in-memory sums, what waits, what it declared. */
interface RunEntry extends RunCounters {
  keyFiles: string[];
  buckets: Record<string, Record<string, BucketEntry>>;
  waiting: WaitingEntry[];
  plan?: RunPlan;
}

/** What a run declares with its activations (IngestRequest.run_plan): its roles and items, for the memory budget. */
export interface RunPlan {
  roles: number;
  items: number;
}

/** How the store keeps memory bounded (the aggregation's settings). */
export interface StoreLimits {
  /** Bytes the runs in memory may hold together (their sums, keys and waiting entries). */
  memoryBudget: number;
  /** A run nothing asked for in this long is let go of at the next checkpoint (its state stays on disk). */
  idleMs: number;
}

export const DEFAULT_STORE_LIMITS: StoreLimits = { memoryBudget: 1536 * 2 ** 20, idleMs: 5 * 60_000 };

/** A run's state would not fit the memory budget: `permanent` when the run alone is over it. */
export class MemoryBudgetExceeded extends Error {
  constructor(message: string, readonly permanent: boolean) {
    super(message);
  }
}

/** A segment is copied forward once its waiting activations are less than this share of it. */
const SPOOL_COMPACT_SHARE = 0.25;
/** A checkpoint starts a new journal segment once the current one holds this much (so that the next checkpoint can delete it). */
const ROTATE_AT_CHECKPOINT_BYTES = 64 * 2 ** 20;

/**
 * The checkpoint manifest's format: 1, before the memory budget (no run plans); 2 adds each
 * run's `plan`. Both are read; a newer one is refused.
 */
export const CHECKPOINT_VERSION = 2;

interface Manifest {
  version: number;
  instanceId: string;
  /** Every journal record before this position is in the snapshot. */
  journal: { segment: number; offset: number };
  runs: Record<string, RunEntry>;
}

/** A file the committed checkpoint refers to is missing or cut short: the message says what to do. */
export class StateIncomplete extends Error {}

/** A journal record that could not be applied at start: where it was, why, and where its bytes were kept. */
export interface Quarantined {
  ref: RecordRef;
  error: string;
  file: string;
}

/**
 * The aggregation's durable state. Every message goes to the journal first (acknowledged only
 * once fsynced); an activation that waits for its score stays in the journal (the spool) and
 * only its position is kept in memory. A checkpoint writes what changed since the last one:
 * the changed buckets' float64 sums (each a new file: write, fsync, rename), the keys added,
 * and a manifest naming everything, committed by an atomic rename of CURRENT; then journal
 * segments nothing refers to are deleted. Opening the store loads the current checkpoint and
 * replays the journal after it, so after kill -9 at any moment the state is exactly what was
 * acknowledged, and re-sent messages are recognised as duplicates.
 */
export class DurableStore {
  readonly state: Accumulators;
  private readonly journal: Journal;
  private chain: Promise<unknown> = Promise.resolve();
  private applied = { segment: 0, offset: 0 };
  private manifest: Manifest | undefined;
  /**
   * The committed checkpoint's number (its manifest is manifest.<n>.json); the next is n + 1.
   * Counted, not read from the clock: a clock stepping back must never make a checkpoint
   * write a file name that the committed manifest still refers to.
   */
  private sequence = 0;
  /** Journal records set aside at start since this process began (see open). */
  quarantinedCount = 0;
  /** Runs being deleted: gone from memory, left out of the next checkpoint. */
  private readonly dropped = new Set<string>();
  /** A checkpoint is being written (runs must not leave memory meanwhile). */
  private checkpointing = false;
  /** What each run declared (IngestRequest.run_plan), kept in its manifest entry. */
  private readonly plans = new Map<string, RunPlan>();

  readonly limits: StoreLimits;

  /** `journalSegmentBytes`: where journal segments end (tests make them small). */
  constructor(readonly dir: string, opts: Partial<StoreLimits> & { journalSegmentBytes?: number } = {}) {
    this.limits = { ...DEFAULT_STORE_LIMITS, ...opts };
    this.journal = new Journal(path.join(dir, 'journal'), opts.journalSegmentBytes);
    // Buckets other than score 3 and default live in files (see coldBucket.ts): memory stays bounded.
    this.state = new Accumulators((run) => path.join(dir, 'runs', run, 'cold'));
    // A run not in memory is read back from the committed checkpoint when it is asked for.
    this.state.loader = (run) => {
      const entry = this.manifest?.runs[run];
      return entry && !this.dropped.has(run) ? this.restored(run, entry) : undefined;
    };
  }

  async open(): Promise<{ replayed: number; quarantined: Quarantined[] }> {
    await mkdirDurable(this.dir);
    this.manifest = await this.readManifest();
    if (this.manifest) this.load(this.manifest);
    const from = this.manifest?.journal ?? { segment: 0, offset: 0 };
    await this.journal.open();
    let replayed = 0;
    const quarantined: Quarantined[] = [];
    // A record that cannot be applied (changed on disk, or its spooled activation is) must not
    // keep the service from starting: it is set aside, with its bytes, and the rest goes on.
    const quarantine = async (payload: Buffer, ref: RecordRef, error: string) => {
      const file = path.join(this.dir, 'quarantine', `${ref.segment}.${ref.offset}.record`);
      await writeFileAtomic(file, payload);
      quarantined.push({ ref, error, file });
      this.applied = { segment: ref.segment, offset: ref.offset + ref.length };
    };
    // Each record applied as it is read (the journal streams its segments): memory does not grow with the journal.
    await this.journal.replay(
      from,
      async (payload, ref) => {
        try {
          await this.apply(IngestRequest.decode(payload), ref);
          replayed++;
        } catch (err) {
          await quarantine(payload, ref, (err as Error).message);
        }
      },
      (payload, ref) => quarantine(payload, ref, `journal segment ${ref.segment}: the record at ${ref.offset} fails its crc32 check (the disk changed it)`),
    );
    this.quarantinedCount += quarantined.length;
    return { replayed, quarantined };
  }

  /**
   * Ingests one message: checked against the current state, journaled (durable), then applied,
   * in journal order. Resolves once the message is durable and counted.
   */
  ingest(req: IngestRequest): Promise<IngestOutcome> {
    const acc = this.state.get(req.run);
    // Checks first, so that nothing invalid reaches the journal. Nothing is decoded: an
    // activation's values are added to its bucket's sums straight from its bytes when it is folded.
    if (req.payload?.$case === 'activation') {
      const { shape, firstNonFinite } = inspectTensor(req.payload.value, 'activation');
      const run = acc ?? new RunAccumulator();
      run.checkDeclaredShape(req.runShape, shape);
      const check = run.checkActivation(req.role, req.itemKey, shape, undefined, firstNonFinite);
      if (check === 'duplicate') return Promise.resolve('duplicate');
      // A run's first activation with its plan: checked against the memory budget.
      if (req.runPlan && !this.plans.has(req.run)) this.admit(req.run, { roles: req.runPlan.roles, items: Number(req.runPlan.items) }, req.runShape);
    } else if (req.payload?.$case === 'score') {
      if ((acc ?? new RunAccumulator()).checkScore(req.role, req.itemKey, req.payload.value.score ?? null) === 'duplicate') return Promise.resolve('duplicate');
    } else {
      throw new IngestError('payload', 'needs an activation or a score');
    }
    // The bytes as they arrived when the service kept them (bulkWire.ts), else encoded again.
    const appended = this.journal.append(receivedBytes.get(req) ?? IngestRequest.encode(req).finish());
    // A failed write (a full disk) can reject this before the queued apply below awaits it: marked
    // handled here, or Node would end the process for an unhandled rejection. The apply still sees it.
    appended.catch(() => undefined);
    return this.serialize(async () => this.apply(req, await appended));
  }

  /**
   * Checks what a run declares (its roles and items, with its shape) against the memory
   * budget: the sums it will hold in memory and its keys, with those of the other runs in
   * memory. Runs nothing asked for lately are let go of to make room; a run alone over the
   * budget is refused for good, one that would fit once others finish is told to wait.
   */
  private admit(run: string, plan: RunPlan, shape: number[]): void {
    if (!(Number.isInteger(plan.roles) && plan.roles >= 1 && Number.isSafeInteger(plan.items) && plan.items >= 1)) throw new IngestError('run_plan', `roles and items must be positive, got ${plan.roles} roles and ${plan.items} items`);
    const need = plannedBytes(plan, shape);
    const gib = (b: number) => `${(b / 2 ** 30).toFixed(2)} GiB`;
    if (need > this.limits.memoryBudget) {
      throw new MemoryBudgetExceeded(`run_plan: a run of ${plan.roles} roles and ${plan.items} items of shape [${shape}] holds about ${gib(need)} in the aggregation's memory, more than its budget of ${gib(this.limits.memoryBudget)} (--memory-budget-mib; chart: aggregation.memoryBudgetMiB, with the container's memory limit above it)`, true);
    }
    const others = () => this.state.entries().filter(([r]) => r !== run).reduce((n, [r, a]) => n + Math.max(a.residentBytes(), this.plans.has(r) ? plannedBytes(this.plans.get(r)!, [a.numLayers, a.hidden]) : 0), 0);
    if (need + others() > this.limits.memoryBudget && !this.checkpointing) {
      // Idle runs leave memory when their state is on disk (nothing changed since the checkpoint;
      // not while a checkpoint is being written, which holds the runs it snapshots).
      for (const [r, a] of this.state.entries().sort(([x], [y]) => this.state.lastUsed(x) - this.state.lastUsed(y))) {
        if (r !== run && !a.changedSinceCheckpoint() && this.manifest?.runs[r] && Date.now() - this.state.lastUsed(r) >= Math.min(this.limits.idleMs, 1000)) this.state.release(r);
        if (need + others() <= this.limits.memoryBudget) break;
      }
    }
    const busy = others();
    if (need + busy > this.limits.memoryBudget) {
      throw new MemoryBudgetExceeded(`run_plan: this run needs about ${gib(need)} of the aggregation's memory and the runs in progress hold ${gib(busy)} of its ${gib(this.limits.memoryBudget)} budget: it starts when they finish`, false);
    }
    this.plans.set(run, plan);
  }

  /** Runs `task` after everything queued before it: applies happen in journal order. */
  private serialize<T>(task: () => Promise<T>): Promise<T> {
    const next = this.chain.then(task, task);
    this.chain = next.catch(() => undefined);
    return next;
  }

  /**
   * Applies a journaled message. Every journaled activation passed the checks when it arrived
   * (ingest, or the ingest before a restart, for replay), so it holds no NaN or infinity.
   */
  private async apply(req: IngestRequest, ref: RecordRef): Promise<IngestOutcome> {
    const acc = this.state.getOrCreate(req.run);
    let outcome: IngestOutcome;
    if (req.payload?.$case === 'activation') {
      const tensor = req.payload.value;
      // Checked when it arrived; folded straight from its wire bytes (never decoded when it waits).
      outcome = acc.addActivation(req.role, req.itemKey, [...tensor.shape], tensor, ref, ALL_FINITE);
    } else {
      const payload = req.payload;
      const r = acc.addScore(req.role, req.itemKey, payload?.$case === 'score' ? (payload.value.score ?? null) : null, ref);
      outcome = r.outcome;
      if ('spooled' in r) {
        const spooled = IngestRequest.decode(await this.journal.read(r.spooled, this.readBuffer(r.spooled.length)));
        if (spooled.payload?.$case !== 'activation') throw new Error(`journal record at ${r.spooled.segment}:${r.spooled.offset} is not an activation`);
        acc.foldSpooled(req.role, req.itemKey, r.bucket, spooled.payload.value, ref);
      }
    }
    this.applied = { segment: ref.segment, offset: ref.offset + ref.length };
    return outcome;
  }

  /** One buffer for spooled records read back: applies run one at a time, and each is decoded at once. */
  private readBuffer(length: number): Buffer {
    if (this.spoolRead.length < length) this.spoolRead = Buffer.allocUnsafe(length);
    return this.spoolRead.subarray(0, length);
  }
  private spoolRead = Buffer.alloc(0);

  /** Writes a checkpoint of what changed, commits it, and deletes journal segments no longer needed. */
  checkpoint(): Promise<boolean> {
    return this.serialize(() => this.checkpointNow(false));
  }

  /**
   * Deletes a run's state: out of memory, out of the checkpoint (committed before this
   * resolves, so a restart does not bring it back), its files, and the journal records it
   * kept waiting. False when there is no such run.
   */
  deleteRun(run: string): Promise<boolean> {
    return this.serialize(async () => {
      if (!this.state.inMemory(run) && !this.manifest?.runs[run]) return false;
      this.state.release(run, true);
      this.plans.delete(run);
      this.dropped.add(run);
      try {
        await this.checkpointNow(true);
        await fs.rm(path.join(this.dir, 'runs', run), { recursive: true, force: true });
      } finally {
        this.dropped.delete(run);
      }
      return true;
    });
  }

  private async checkpointNow(force: boolean): Promise<boolean> {
    this.checkpointing = true;
    try {
      return await this.writeCheckpoint(force);
    } finally {
      this.checkpointing = false;
    }
  }

  private async writeCheckpoint(force: boolean): Promise<boolean> {
    const moved = await this.compactSpool();
    const runs = this.state.entries();
    const changed = runs.some(([, acc]) => acc.changedSinceCheckpoint());
    if (!force && !moved && !changed && this.manifest && this.manifest.journal.segment === this.applied.segment && this.manifest.journal.offset === this.applied.offset) {
      this.releaseIdle();
      return false;
    }
    // Above every name the committed manifest refers to (files of a checkpoint that failed before its commit are not referred to, and may be written over).
    const n = this.sequence + 1;
    const manifest: Manifest = { version: CHECKPOINT_VERSION, instanceId: this.state.instanceId, journal: { ...this.applied }, runs: {} };
    // Runs not in memory are as the last checkpoint has them.
    for (const [run, entry] of Object.entries(this.manifest?.runs ?? {})) if (!this.dropped.has(run) && !this.state.inMemory(run)) manifest.runs[run] = entry;
    for (const [run, acc] of runs) {
      acc.syncCold();
      const snapshot = acc.toSnapshot();
      const before = this.manifest?.runs[run];
      const runDir = path.join(this.dir, 'runs', run);
      await mkdirDurable(runDir);
      const buckets: RunEntry['buckets'] = {};
      for (const { role, bucket, sum, changed: bucketChanged } of snapshot.buckets) {
        const previous = before?.buckets[role]?.[bucket];
        let entry: BucketEntry;
        if (!bucketChanged && previous) {
          entry = previous;
        } else {
          entry = { count: sum.count, file: `${role}.${bucket}.${n}.f64` };
          await writeFileAtomic(path.join(runDir, entry.file), new Uint8Array(sum.sum.buffer, sum.sum.byteOffset, sum.sum.byteLength));
        }
        (buckets[role] ??= {})[bucket] = entry;
      }
      const keyFiles = [...(before?.keyFiles ?? [])];
      if (snapshot.newKeys.activations.length || snapshot.newKeys.scores.length) {
        const file = `keys.${n}.json`;
        await writeFileAtomic(path.join(runDir, file), JSON.stringify(snapshot.newKeys));
        keyFiles.push(file);
      }
      manifest.runs[run] = { ...snapshot.counters, keyFiles, buckets, waiting: snapshot.waiting, plan: this.plans.get(run) };
    }
    await writeFileAtomic(path.join(this.dir, `manifest.${n}.json`), JSON.stringify(manifest));
    await writeFileAtomic(path.join(this.dir, 'CURRENT'), `manifest.${n}.json\n`);
    this.manifest = manifest;
    this.sequence = n;
    for (const [, acc] of runs) acc.markCheckpointed();
    // The segment this checkpoint reaches into is deleted by the next one, once appends have moved on from it.
    if (this.journal.active().bytes >= ROTATE_AT_CHECKPOINT_BYTES) this.journal.rotate();
    await this.collectGarbage(manifest);
    this.releaseIdle();
    return true;
  }

  /** Lets go of the runs nothing asked for in `limits.idleMs` whose state is all on disk (a finished run, say). */
  private releaseIdle(): void {
    const now = Date.now();
    for (const [run, acc] of this.state.entries()) {
      if (now - this.state.lastUsed(run) >= this.limits.idleMs && !acc.changedSinceCheckpoint() && this.manifest?.runs[run]) this.state.release(run);
    }
  }

  /**
   * Copies the waiting activations out of journal segments that are mostly spent (the
   * checkpoint covers them, and what still waits there is under SPOOL_COMPACT_SHARE of the
   * segment) to the journal's end, so that the old segment can be deleted once the checkpoint
   * naming the copies is committed. A copy replayed after a crash is a duplicate of a key
   * already seen, and changes nothing. Returns how many were moved.
   */
  private async compactSpool(): Promise<number> {
    const before = Math.min(this.manifest?.journal.segment ?? 0, this.applied.segment);
    const live = new Map<number, { bytes: number; records: { acc: RunAccumulator; key: string; ref: RecordRef }[] }>();
    for (const [, acc] of this.state.entries()) {
      for (const { key, ref } of acc.spooled()) {
        if (ref.segment >= before) continue;
        let seg = live.get(ref.segment);
        if (!seg) live.set(ref.segment, (seg = { bytes: 0, records: [] }));
        seg.bytes += ref.length;
        seg.records.push({ acc, key, ref });
      }
    }
    // Runs not in memory keep their waiting records where they are until they are loaded again (or deleted).
    const pinnedByOthers = new Set<number>();
    for (const [run, entry] of Object.entries(this.manifest?.runs ?? {})) if (!this.state.inMemory(run) && !this.dropped.has(run)) for (const w of entry.waiting) if (w.ref) pinnedByOthers.add(w.ref.segment);
    let moved = 0;
    for (const [segment, { bytes, records }] of live) {
      if (pinnedByOthers.has(segment) || bytes >= SPOOL_COMPACT_SHARE * (await this.journal.sizeOf(segment))) continue;
      // Appended together, so that the group commit makes them durable with one fsync.
      const copies = [];
      for (const { acc, key, ref } of records) {
        const appended = this.journal.append(Buffer.from(await this.journal.read(ref)));
        // A failed write (a full disk) is seen by the await below; marked handled until then.
        appended.catch(() => undefined);
        copies.push({ acc, key, appended });
      }
      for (const { acc, key, appended } of copies) {
        acc.moveSpooled(key, await appended);
        moved++;
      }
    }
    return moved;
  }

  /**
   * Deletes what the committed checkpoint does not name: older manifests, bucket and key files
   * (replaced ones, and those of checkpoints that failed before their commit, e.g. on a full
   * disk), temporary files of writes cut short, and journal segments before the checkpoint
   * that hold no waiting activation.
   */
  private async collectGarbage(current: Manifest): Promise<void> {
    const currentName = (await fs.readFile(path.join(this.dir, 'CURRENT'), 'utf8')).trim();
    for (const f of await fs.readdir(this.dir)) {
      if ((/^manifest\.\d+\.json$/.test(f) && f !== currentName) || /^\..*\.tmp$/.test(f)) await fs.rm(path.join(this.dir, f), { force: true });
    }
    for (const [run, r] of Object.entries(current.runs)) {
      if (!this.state.inMemory(run)) continue; // unchanged since its files were collected
      const named = new Set<string>([...r.keyFiles, ...Object.values(r.buckets).flatMap((byBucket) => Object.values(byBucket).map((b) => b.file))]);
      const runDir = path.join(this.dir, 'runs', run);
      for (const f of await fs.readdir(runDir).catch(() => [] as string[])) {
        if (/\.f64$|^keys\.\d+\.json$|^\..*\.tmp$/.test(f) && !named.has(f)) await fs.rm(path.join(runDir, f), { force: true });
      }
    }
    const spooled = new Set<number>();
    for (const r of Object.values(current.runs)) for (const w of r.waiting) if (w.ref) spooled.add(w.ref.segment);
    for (const seg of await this.journal.segments()) {
      if (seg < current.journal.segment && !spooled.has(seg)) await this.journal.remove(seg);
    }
  }

  /** The committed checkpoint; none only when there is no CURRENT (a CURRENT that cannot be read is an error). */
  private async readManifest(): Promise<Manifest | undefined> {
    let name: string;
    try {
      name = (await fs.readFile(path.join(this.dir, 'CURRENT'), 'utf8')).trim();
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    const numbered = /^manifest\.(\d+)\.json$/.exec(name);
    if (!numbered) throw new Error(`${path.join(this.dir, 'CURRENT')} names ${JSON.stringify(name)}, not a checkpoint manifest (manifest.<n>.json): the state directory was changed by hand`);
    this.sequence = Number(numbered[1]);
    const manifest = JSON.parse(await fs.readFile(path.join(this.dir, name), 'utf8')) as Manifest;
    checkFormatVersion('the checkpoint', path.join(this.dir, name), manifest.version, CHECKPOINT_VERSION);
    return manifest;
  }

  /**
   * Takes the committed checkpoint: each run's files are checked (present, of the size
   * written) but read only when the run is asked for (`restored`), so that a start holds only
   * the runs in use.
   */
  private load(m: Manifest): void {
    this.state.instanceId = m.instanceId;
    for (const [run, r] of Object.entries(m.runs)) {
      if (r.plan) this.plans.set(run, r.plan);
      for (const f of r.keyFiles) this.readRunFile(run, f, undefined, false);
      for (const byBucket of Object.values(r.buckets)) for (const b of Object.values(byBucket)) this.readRunFile(run, b.file, r.numLayers * r.hidden * 8, false);
    }
    this.applied = { ...m.journal };
  }

  /** A run of the committed checkpoint as the accumulators take it back, its files read as they are reached. */
  private restored(run: string, r: RunEntry): RestoredRun {
    const read = (file: string, bytes?: number) => this.readRunFile(run, file, bytes, true)!;
    return {
      counters: { numLayers: r.numLayers, hidden: r.hidden, folded: r.folded, rejectedNonFinite: r.rejectedNonFinite },
      // Read file by file as the run takes them, so one key file's JSON is in memory at a time.
      keys: (function* () {
        for (const f of r.keyFiles) yield JSON.parse(read(f).toString('utf8')) as { activations: string[]; scores: string[] };
      })(),
      buckets: (function* () {
        for (const [role, byBucket] of Object.entries(r.buckets)) {
          for (const [bucket, b] of Object.entries(byBucket)) {
            const bytes = read(b.file, r.numLayers * r.hidden * 8);
            yield { role, bucket: bucket as Bucket, sum: { sum: new Float64Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength)), count: b.count } };
          }
        }
      })(),
      waiting: r.waiting,
    };
  }

  /**
   * A file of a run that the committed checkpoint refers to (its contents when `contents`, else
   * only checked), missing or of the wrong size: the state directory is incomplete, said with
   * what to do instead of a crash at every start.
   */
  private readRunFile(run: string, file: string, bytes: number | undefined, contents: boolean): Buffer | undefined {
    const full = path.join(this.dir, 'runs', run, file);
    const incomplete = (why: string) =>
      new StateIncomplete(`${full}, which the committed checkpoint refers to, ${why}: the state directory is incomplete (a copy cut short, a file removed by hand). Restore it from a copy; or move it aside and start again, and the coordinator sends every activation of its runs again when it finds aggregation holding fewer than it acknowledged`);
    try {
      if (!contents) {
        const size = fsSync.statSync(full).size;
        if (bytes !== undefined && size !== bytes) throw incomplete(`holds ${size} bytes where ${bytes} were written`);
        return undefined;
      }
      const data = fsSync.readFileSync(full);
      if (bytes !== undefined && data.length !== bytes) throw incomplete(`holds ${data.length} bytes where ${bytes} were written`);
      return data;
    } catch (err) {
      if (err instanceof StateIncomplete) throw err;
      throw incomplete(`cannot be read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
    }
  }

  /** Activations or scores waiting for their other half, all runs (those not in memory as their checkpoint has them). */
  totalWaiting(): number {
    let n = this.state.totalWaiting();
    for (const [run, r] of Object.entries(this.manifest?.runs ?? {})) if (!this.state.inMemory(run)) n += r.waiting.length;
    return n;
  }

  /** Bytes of activations spooled in the journal waiting for their score, all runs. */
  totalSpooledBytes(): number {
    let n = this.state.totalSpooledBytes();
    for (const [run, r] of Object.entries(this.manifest?.runs ?? {})) if (!this.state.inMemory(run)) for (const w of r.waiting) n += w.ref?.length ?? 0;
    return n;
  }

  /** Runs in memory now. */
  runsInMemory(): number {
    return this.state.entries().length;
  }

  /** Runs of the store, in memory or not. */
  runCount(): number {
    return new Set([...Object.keys(this.manifest?.runs ?? {}), ...this.state.entries().map(([r]) => r)]).size;
  }

  /** Estimated bytes the runs in memory hold, against `limits.memoryBudget`. */
  residentBytes(): number {
    return this.state.entries().reduce((n, [, acc]) => n + acc.residentBytes(), 0);
  }

  async close(): Promise<void> {
    await this.chain;
    await this.journal.close();
    this.state.close();
  }
}

/** Memory a run of this plan holds at most: a sum in memory per role (score 3, or a default role's items) and both keys of every item. */
function plannedBytes(plan: RunPlan, shape: number[]): number {
  const [layers = 0, hidden = 0] = shape;
  return plan.roles * layers * hidden * 8 + plan.items * 2 * KEY_BYTES;
}
