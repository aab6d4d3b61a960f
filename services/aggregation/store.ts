import * as fsSync from 'node:fs';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { IngestRequest } from '../../gen/assistant_axis/v1/aggregation';
import { receivedBytes } from '../shared/bulkWire';
import { mkdirDurable, writeFileAtomic } from '../shared/files';
import { ALL_FINITE, inspectTensor } from '../shared/tensor';
import { Accumulators, Bucket, IngestError, IngestOutcome, RunAccumulator, RunCounters, WaitingEntry } from './accumulator';
import { Journal, RecordRef } from './journal';

interface BucketEntry {
  count: number;
  file: string;
}

/** A run in a manifest: its counters, the files holding its keys and in-memory sums, what waits. */
interface RunEntry extends RunCounters {
  keyFiles: string[];
  buckets: Record<string, Record<string, BucketEntry>>;
  waiting: WaitingEntry[];
}

interface Manifest {
  version: 1;
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

  constructor(readonly dir: string) {
    this.journal = new Journal(path.join(dir, 'journal'));
    // Buckets other than score 3 and default live in files (see coldBucket.ts): memory stays bounded.
    this.state = new Accumulators((run) => path.join(dir, 'runs', run, 'cold'));
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
    return this.serialize(async () => {
      const runs = this.state.entries();
      const changed = runs.some(([, acc]) => acc.changedSinceCheckpoint());
      if (!changed && this.manifest && this.manifest.journal.segment === this.applied.segment && this.manifest.journal.offset === this.applied.offset) return false;
      // Above every name the committed manifest refers to (files of a checkpoint that failed before its commit are not referred to, and may be written over).
      const n = this.sequence + 1;
      const manifest: Manifest = { version: 1, instanceId: this.state.instanceId, journal: { ...this.applied }, runs: {} };
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
        manifest.runs[run] = { ...snapshot.counters, keyFiles, buckets, waiting: snapshot.waiting };
      }
      await writeFileAtomic(path.join(this.dir, `manifest.${n}.json`), JSON.stringify(manifest));
      await writeFileAtomic(path.join(this.dir, 'CURRENT'), `manifest.${n}.json\n`);
      this.manifest = manifest;
      this.sequence = n;
      for (const [, acc] of runs) acc.markCheckpointed();
      await this.collectGarbage(manifest);
      return true;
    });
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
    return JSON.parse(await fs.readFile(path.join(this.dir, name), 'utf8')) as Manifest;
  }

  private load(m: Manifest): void {
    this.state.instanceId = m.instanceId;
    for (const [run, r] of Object.entries(m.runs)) {
      const runDir = path.join(this.dir, 'runs', run);
      // A file the committed checkpoint refers to, missing or of the wrong size: the state
      // directory is incomplete, said with what to do instead of a crash at every start.
      const incomplete = (file: string, why: string) =>
        new StateIncomplete(`${path.join(runDir, file)}, which the committed checkpoint refers to, ${why}: the state directory is incomplete (a copy cut short, a file removed by hand). Restore it from a copy; or move it aside and start again, and the coordinator sends every activation of its runs again when it finds aggregation holding fewer than it acknowledged`);
      const read = (file: string, bytes?: number) => {
        let data: Buffer;
        try {
          data = fsSync.readFileSync(path.join(runDir, file));
        } catch (err) {
          throw incomplete(file, `cannot be read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
        }
        if (bytes !== undefined && data.length !== bytes) throw incomplete(file, `holds ${data.length} bytes where ${bytes} were written`);
        return data;
      };
      // Read file by file as the run takes them, so one key file's JSON is in memory at a time.
      const keys = function* () {
        for (const f of r.keyFiles) yield JSON.parse(read(f).toString('utf8')) as { activations: string[]; scores: string[] };
      };
      const buckets = function* () {
        for (const [role, byBucket] of Object.entries(r.buckets)) {
          for (const [bucket, b] of Object.entries(byBucket)) {
            const bytes = read(b.file, r.numLayers * r.hidden * 8);
            yield { role, bucket: bucket as Bucket, sum: { sum: new Float64Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength)), count: b.count } };
          }
        }
      };
      this.state.restore(run, {
        counters: { numLayers: r.numLayers, hidden: r.hidden, folded: r.folded, rejectedNonFinite: r.rejectedNonFinite },
        keys: keys(),
        buckets: buckets(),
        waiting: r.waiting,
      });
    }
    this.applied = { ...m.journal };
  }

  async close(): Promise<void> {
    await this.chain;
    await this.journal.close();
    this.state.close();
  }
}
