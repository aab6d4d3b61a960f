// Every default of the system, stated once. docs/CONCEPTS.md says what they are for.

export const DEFAULT_PORTS = {
  coordinator: 50051,
  inference: 50052,
  judge: 50053,
  aggregation: 50054,
} as const;

export const DEFAULT_METRICS_PORTS = {
  coordinator: 9101,
  inference: 9102,
  judge: 9103,
  aggregation: 9104,
} as const;

export const DEFAULT_SAMPLING = {
  temperature: 0.7,
  topP: 0.9,
  maxNewTokens: 512,
  maxContext: 2048,
  seed: 0,
} as const;

/**
 * The longest context a request may ask for, in tokens: above every supported model's (Llama
 * 3.3's 128k is the longest), so that max_context is a bound and not a way to ask for anything.
 */
export const MAX_CONTEXT_TOKENS = 131_072;

/**
 * Characters per token no text exceeds in practice (a vocabulary's longest tokens are runs of
 * spaces or punctuation of a few dozen characters): a conversation longer than this many
 * characters per token of its budget cannot fit, and is refused before it is tokenized.
 */
export const MAX_CHARS_PER_TOKEN = 64;

/** Tokens per prefill run of a projection (ProjectConversation's chunk_tokens), its default and bound. */
export const DEFAULT_PROJECTION_CHUNK = 512;
export const MAX_PROJECTION_CHUNK = 8192;
/** The longest conversation a projection takes (the model's own context bounds it further). */
export const MAX_PROJECTION_TOKENS = MAX_CONTEXT_TOKENS;

export const DEFAULT_MIN_COUNT = 50;
export const DEFAULT_JUDGE_MODEL = 'gpt-4.1-mini';
export const JUDGE_MAX_TOKENS = 10;
export const JUDGE_TEMPERATURE = 1;
/** The score a role's items need to count towards its vector (the reference's "fully role-playing"). */
export const ROLE_VECTOR_SCORES: readonly number[] = [3];

/**
 * grpc-js refuses messages over 4 MiB by default; one f32 activation of an 80 x 8192 model
 * is 2.6 MB and a role vector stream carries several, so every channel and server raises it
 * deliberately to this bound.
 */
export const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

/**
 * The most a call to the coordinator's public port may send: its requests are names, paths
 * and parameters (a 30,000-token conversation for projection is about 120 KB of text), so a
 * few MiB, and nothing a stranger can make it allocate by the 64 MiB of the internal services.
 */
export const COORDINATOR_MAX_RECEIVE_BYTES = 4 * 1024 * 1024;

/**
 * Encoded bytes of requests one stream may have a service handling at once; past it the
 * stream is not read until some are answered (a window of Generate requests is a few MB; an
 * Ingest window of 80 x 8192 f32 activations about 170 MB).
 */
export const MAX_PENDING_BYTES_PER_STREAM = 256 * 1024 * 1024;

/** The same bound over all of a service's streams together. */
export const DEFAULT_SERVICE_PENDING_BYTES = 1024 * 1024 * 1024;

/**
 * Streams one client connection may hold open on a server at once (HTTP/2
 * SETTINGS_MAX_CONCURRENT_STREAMS): the coordinator holds a few per upstream, a client a few
 * watches; without it a connection could open thousands.
 */
export const MAX_CONCURRENT_STREAMS = 100;

/** Seconds a service waits for in-flight calls on SIGTERM before it forces its server down. */
export const DRAIN_SECONDS = 10;

/**
 * HTTP/2 keepalive on every channel and server: a peer that vanished without closing its
 * connection (a node lost, a partition) is noticed within about a minute instead of the
 * kernel's TCP timeout (about 15 minutes), so its streams fail and their items are retried
 * elsewhere. The answer may take 30 s: a timeout shorter than a stall of the peer's event
 * loop drops a healthy connection (a 10 s one dropped a run's watchers while its report was
 * computed).
 */
export const KEEPALIVE_TIME_MS = 30_000;
export const KEEPALIVE_TIMEOUT_MS = 30_000;

/**
 * The longest a request on one of the coordinator's long-lived streams may wait for its reply
 * before the stream is taken for hung: cancelled, and everything in flight on it retried. A
 * generation waits behind at most a window of others; a judgement may sit in the judge's own
 * retries through an API outage; an ingest waits only for an fsync.
 */
export const STREAM_REPLY_TIMEOUT_MS = { inference: 15 * 60_000, judge: 15 * 60_000, aggregation: 2 * 60_000 } as const;

/**
 * Node flags every service process starts with (the local stack, the images, the chart).
 * Each item moves activations of hundreds of KB through a process whose own heap is small
 * (about 16 MB live); V8 sized its old generation from that and began a full mark-compact
 * every few dozen items (12 a second at 100 items/s: a quarter of each process's time). A
 * larger initial old generation lets the young-generation collections free the buffers, and
 * it is only an initial size: the heap still grows and shrinks with what is live. Measured in
 * docs/PERFORMANCE.md (full-scale rehearsal): 104 to 172 items/s on the same run.
 */
export const NODE_FLAGS: readonly string[] = ['--initial-old-space-size=128'];
