import type * as grpc from '@grpc/grpc-js';

/**
 * A request/response view of a bidirectional stream whose results name their request
 * (item id): `send` resolves when the matching result arrives. If the stream breaks,
 * every pending request is rejected with the stream's error and the next `send` opens a
 * new stream, so callers simply retry what failed.
 */
export class StreamPipe<Req, Res> {
  private call: grpc.ClientDuplexStream<Req, Res> | undefined;
  private readonly pending = new Map<string, { resolve: (r: Res) => void; reject: (e: Error) => void }>();

  constructor(
    private readonly open: () => grpc.ClientDuplexStream<Req, Res>,
    private readonly idOf: (res: Res) => string,
  ) {}

  get inFlight(): number {
    return this.pending.size;
  }

  send(id: string, req: Req): Promise<Res> {
    if (this.pending.has(id)) return Promise.reject(new Error(`request ${id} is already in flight`));
    const call = this.ensure();
    return new Promise<Res>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      call.write(req);
    });
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
