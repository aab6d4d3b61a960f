import type * as grpc from '@grpc/grpc-js';

/**
 * A request/response view of a bidirectional stream whose results name their request
 * (item id): `send` resolves when the matching result arrives. If the stream breaks,
 * every pending request is rejected with the stream's error and the next `send` opens a
 * new stream, so callers simply retry what failed.
 */
export class StreamPipe<Req, Res> {
  private call: grpc.ClientDuplexStream<Req, Res> | undefined;
  /** In send order (a Map keeps insertion order): the first is the one waiting longest. */
  private readonly pending = new Map<string, { resolve: (r: Res) => void; reject: (e: Error) => void; sentAt: number }>();
  private watchdog: NodeJS.Timeout | undefined;

  /**
   * `replyTimeoutMs`: a request without its reply for this long means the peer hangs (alive,
   * connected, answering pings, but not this): the stream is cancelled and every request in
   * flight on it fails, to be retried. 0: wait forever.
   */
  constructor(
    private readonly open: () => grpc.ClientDuplexStream<Req, Res>,
    private readonly idOf: (res: Res) => string,
    private readonly replyTimeoutMs = 0,
  ) {}

  get inFlight(): number {
    return this.pending.size;
  }

  send(id: string, req: Req): Promise<Res> {
    if (this.pending.has(id)) return Promise.reject(new Error(`request ${id} is already in flight`));
    const call = this.ensure();
    return new Promise<Res>((resolve, reject) => {
      this.pending.set(id, { resolve, reject, sentAt: Date.now() });
      call.write(req);
      this.watch();
    });
  }

  /** One timer per pipe, looking only at the oldest request, whatever the number in flight. */
  private watch(): void {
    if (this.watchdog || this.replyTimeoutMs <= 0) return;
    this.watchdog = setInterval(() => {
      const oldest = this.pending.entries().next();
      if (oldest.done) {
        clearInterval(this.watchdog);
        this.watchdog = undefined;
        return;
      }
      const [id, p] = oldest.value;
      if (Date.now() - p.sentAt < this.replyTimeoutMs) return;
      const call = this.call;
      this.call = undefined;
      call?.cancel();
      // Ids may join their parts with NUL (ingestId): shown with slashes.
      this.failAll(new Error(`no reply to ${id.replace(/\u0000/g, '/')} within ${this.replyTimeoutMs < 10_000 ? `${this.replyTimeoutMs} ms` : `${Math.round(this.replyTimeoutMs / 1000)} s`}: the stream was cancelled as hung`));
    }, Math.max(10, Math.min(5000, this.replyTimeoutMs / 4)));
    this.watchdog.unref();
  }

  close(): void {
    const call = this.call;
    this.call = undefined;
    call?.end();
    this.failAll(new Error('stream closed'));
  }

  cancel(): void {
    const call = this.call;
    this.call = undefined;
    call?.cancel();
    this.failAll(new Error('stream cancelled'));
  }

  private ensure(): grpc.ClientDuplexStream<Req, Res> {
    if (this.call) return this.call;
    const call = this.open();
    this.call = call;
    call.on('data', (res: Res) => {
      const id = this.idOf(res);
      const p = this.pending.get(id);
      if (!p) return;
      this.pending.delete(id);
      p.resolve(res);
    });
    const broken = (err: Error) => {
      if (this.call !== call) return;
      this.call = undefined;
      this.failAll(err);
    };
    call.on('error', broken);
    call.on('end', () => broken(new Error('stream ended by the server')));
    return call;
  }

  private failAll(err: Error): void {
    const all = [...this.pending.values()];
    this.pending.clear();
    for (const p of all) p.reject(err);
  }
}
