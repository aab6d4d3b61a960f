import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { crc32 } from 'node:zlib';
import { mkdirDurable, writeFileAtomic } from '../shared/files';
import { checkFormatVersion } from '../shared/formatVersion';

/** Where a record lives: its segment, and the byte offset and length of its payload. */
export interface RecordRef {
  segment: number;
  offset: number;
  length: number;
}

const HEADER = 8; // u32 payload length, u32 crc32 of the payload

/** Bytes of a segment read at a time by replay (a longer record is read in one piece). */
export const REPLAY_WINDOW = 4 * 1024 * 1024;

/** The records' format ([length][crc32][payload], an IngestRequest): in `<journal>/FORMAT`. */
export const JOURNAL_VERSION = 1;

/** A record that cannot be read back as it was written. */
export class JournalCorruption extends Error {}
const SEGMENT_BYTES = 256 * 1024 * 1024;

/**
 * An append-only journal of records in numbered segment files (`journal-000001.log`, ...),
 * each record [length][crc32][payload]. Appends are group-committed: records queued while a
 * write is in progress go out together, with one fsync, and each append resolves only once
 * its record is durable. A process that opens the journal starts a new segment, so a record
 * torn by a crash is never appended to; replay stops at the first torn record of a segment.
 * A segment ends once it holds `segmentBytes` (or when `rotate` asks), however busy the
 * journal is: the record that would go past it starts the next one.
 */
export class Journal {
  private handle: fs.FileHandle | undefined;
  /** The segment `handle` writes. */
  private handleSegment = 0;
  /** The segment the next append goes to, and its size with everything appended so far. */
  private segment = 0;
  private size = 0;
  private queue: { header: Buffer; payload: Uint8Array; ref: RecordRef; resolve: () => void; reject: (e: Error) => void }[] = [];
  private writing: Promise<void> | undefined;

  /** `segmentBytes`: a segment is closed, and the next started, once it holds this much. */
  constructor(readonly dir: string, private readonly segmentBytes = SEGMENT_BYTES) {}

  async open(): Promise<void> {
    await mkdirDurable(this.dir);
    // The records' format: a journal from before versions has no FORMAT file and is version 1.
    const format = path.join(this.dir, 'FORMAT');
    const written = await fs.readFile(format, 'utf8').catch((err: NodeJS.ErrnoException) => (err.code === 'ENOENT' ? undefined : Promise.reject(err)));
    if (written === undefined) await writeFileAtomic(format, `${JOURNAL_VERSION}\n`);
    else checkFormatVersion('the journal', format, Number(written.trim()), JOURNAL_VERSION);
    const existing = await this.segments();
    this.segment = (existing[existing.length - 1] ?? 0) + 1;
    this.size = 0;
    await this.openSegment(this.segment);
  }

  /** Segment numbers on disk, ascending. */
  async segments(): Promise<number[]> {
    return (await fs.readdir(this.dir))
      .map((f) => /^journal-(\d+)\.log$/.exec(f))
      .filter((m): m is RegExpExecArray => !!m)
      .map((m) => Number(m[1]))
      .sort((a, b) => a - b);
  }

  /** The position after everything appended so far. */
  position(): { segment: number; offset: number } {
    return { segment: this.segment, offset: this.size };
  }

  /** The segment appends go to now, and how many bytes it holds with what is queued. */
  active(): { segment: number; bytes: number } {
    return { segment: this.segment, bytes: this.size };
  }

  /** Ends the current segment: the next append starts a new one (a checkpoint does this so that the segment it covers can be deleted). */
  rotate(): void {
    if (this.size > 0) {
      this.segment++;
      this.size = 0;
    }
  }

  append(payload: Uint8Array): Promise<RecordRef> {
    // Full: this record starts the next segment (the flush loop opens it when it gets there).
    if (this.size > 0 && this.size + HEADER + payload.byteLength > this.segmentBytes) this.rotate();
    // The payload is written as it is (no copy into a record buffer): the caller must not change it.
    const header = Buffer.alloc(HEADER);
    header.writeUInt32LE(payload.byteLength, 0);
    header.writeUInt32LE(crc32(payload), 4);
    const ref = { segment: this.segment, offset: this.size + HEADER, length: payload.byteLength };
    this.size += HEADER + payload.byteLength;
    return new Promise((resolve, reject) => {
      this.queue.push({ header, payload, ref, resolve: () => resolve(ref), reject });
      this.writing ??= this.flush();
    });
  }

  private async flush(): Promise<void> {
    while (this.queue.length) {
      // The queued records of one segment (appends may have moved on to the next).
      const segment = this.queue[0].ref.segment;
      let end = 0;
      while (end < this.queue.length && this.queue[end].ref.segment === segment) end++;
      const batch = this.queue.splice(0, end);
      const total = batch.reduce((n, b) => n + HEADER + b.payload.byteLength, 0);
      try {
        if (this.handleSegment !== segment) await this.openSegment(segment);
        // A full disk can end a write short without an error: that is a failure too, or every
        // later record would lie at another offset than its reference says.
        const { bytesWritten } = await this.handle!.writev(batch.flatMap((b) => [b.header, b.payload]));
        if (bytesWritten !== total) throw Object.assign(new Error(`journal: wrote ${bytesWritten} of ${total} bytes: the disk is full`), { code: 'ENOSPC' });
        await this.handle!.sync();
        for (const b of batch) b.resolve();
      } catch (err) {
        // A failed write (a full disk) may have left part of the batch in the file: cut it off,
        // and move the records queued after it back into its place, so that the segment stays a
        // sequence of whole records and replay never stops at a torn one before acknowledged ones.
        if (this.handleSegment === segment) await this.handle!.truncate(batch[0].ref.offset - HEADER).catch(() => undefined);
        if (this.segment === segment) this.size -= total;
        for (const q of this.queue) if (q.ref.segment === segment) q.ref.offset -= total;
        for (const b of batch) b.reject(err as Error);
      }
    }
    this.writing = undefined;
  }

  /**
   * A record's payload read back (a spooled activation), into `into` when given (it must hold
   * `ref.length` bytes), checked against its header's length and crc32.
   */
  async read(ref: RecordRef, into?: Buffer): Promise<Buffer> {
    const handle = await this.reader(ref.segment);
    const header = Buffer.allocUnsafe(HEADER);
    const buf = into ?? Buffer.allocUnsafe(ref.length);
    const [h, b] = await Promise.all([handle.read(header, 0, HEADER, ref.offset - HEADER), handle.read(buf, 0, ref.length, ref.offset)]);
    if (h.bytesRead !== HEADER || b.bytesRead !== ref.length) throw new JournalCorruption(`journal segment ${ref.segment} is shorter than the record at ${ref.offset} it should hold`);
    if (header.readUInt32LE(0) !== ref.length || crc32(buf.subarray(0, ref.length)) !== header.readUInt32LE(4)) {
      throw new JournalCorruption(`journal segment ${ref.segment}: the record at ${ref.offset} fails its crc32 check (the disk changed it)`);
    }
    return buf;
  }

  /** A read handle per segment, kept open (spooled records of a segment are read back one by one). */
  private reader(segment: number): Promise<fs.FileHandle> {
    let h = this.readers.get(segment);
    if (!h) {
      h = fs.open(this.file(segment), 'r');
      h.catch(() => this.readers.delete(segment));
      this.readers.set(segment, h);
    }
    return h;
  }
  private readonly readers = new Map<number, Promise<fs.FileHandle>>();

  private async closeReader(segment: number): Promise<void> {
    const h = this.readers.get(segment);
    this.readers.delete(segment);
    await (await h?.catch(() => undefined))?.close();
  }

  /** Bytes of a segment replay reads at a time (REPLAY_WINDOW; tests make it small). */
  replayWindow = REPLAY_WINDOW;

  /**
   * Calls `apply` for every intact record from `from` on, in order. A record that fails its
   * crc32 with more records after it was changed on disk after it was acknowledged: `corrupt`
   * is told, and the replay goes on past it. One at a segment's end that is cut short or fails
   * its crc32 was torn by a crash while being written (never acknowledged): the segment ends there.
   */
  async replay(
    from: { segment: number; offset: number },
    apply: (payload: Buffer, ref: RecordRef) => void | Promise<void>,
    corrupt: (payload: Buffer, ref: RecordRef) => void | Promise<void> = () => undefined,
  ): Promise<number> {
    let count = 0;
    for (const seg of await this.segments()) {
      if (seg < from.segment || seg >= this.segment) continue;
      // Read in windows of REPLAY_WINDOW bytes (a record longer than that in one piece): memory
      // stays bounded whatever the segment's size, and each record is applied before the next
      // is read (a payload is a view of the window, valid until its callback has finished).
      const handle = await fs.open(this.file(seg), 'r');
      try {
        const size = (await handle.stat()).size;
        let window = Buffer.alloc(0);
        let windowAt = 0; // the file offset of window[0]
        const bytesAt = async (at: number, length: number): Promise<Buffer | undefined> => {
          if (at + length > size) return undefined;
          if (at < windowAt || at + length > windowAt + window.length) {
            window = Buffer.allocUnsafe(Math.min(Math.max(this.replayWindow, length), size - at));
            const { bytesRead } = await handle.read(window, 0, window.length, at);
            window = window.subarray(0, bytesRead);
            windowAt = at;
            if (bytesRead < length) return undefined;
          }
          return window.subarray(at - windowAt, at - windowAt + length);
        };
        let at = seg === from.segment ? from.offset : 0;
        for (;;) {
          const header = await bytesAt(at, HEADER);
          if (!header) break;
          const length = header.readUInt32LE(0);
          const crc = header.readUInt32LE(4);
          const payload = await bytesAt(at + HEADER, length);
          if (!payload) break; // torn by a crash: nothing after it was acknowledged
          const ref = { segment: seg, offset: at + HEADER, length };
          at += HEADER + length;
          if (crc32(payload) !== crc) {
            if (at >= size) break; // the last record, torn
            await corrupt(payload, ref);
            continue;
          }
          await apply(payload, ref);
          count++;
        }
      } finally {
        await handle.close();
      }
    }
    return count;
  }

  /** A segment file's size in bytes (0 when it is gone). */
  async sizeOf(segment: number): Promise<number> {
    return (await fs.stat(this.file(segment)).catch(() => undefined))?.size ?? 0;
  }

  async remove(segment: number): Promise<void> {
    await this.closeReader(segment);
    await fs.rm(this.file(segment), { force: true });
  }

  async close(): Promise<void> {
    await this.writing;
    await this.handle?.close();
    this.handle = undefined;
    this.handleSegment = 0;
    for (const segment of [...this.readers.keys()]) await this.closeReader(segment);
  }

  /** Makes `segment`'s file the one written (closing the one before). */
  private async openSegment(segment: number): Promise<void> {
    const before = this.handle;
    this.handle = undefined;
    await before?.close();
    this.handle = await fs.open(this.file(segment), 'a');
    this.handleSegment = segment;
    // The new file's name must survive a crash too.
    const dir = await fs.open(this.dir, 'r');
    await dir.sync();
    await dir.close();
  }

  private file(segment: number): string {
    return path.join(this.dir, `journal-${String(segment).padStart(6, '0')}.log`);
  }
}
