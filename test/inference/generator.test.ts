import { OnnxBackend } from '../../services/inference/onnx/backend';
import { LoadedModel } from '../../services/inference/onnx/model';
import { CompletionsGenerator, GENERATOR_DEFAULTS, GeneratorOutcome } from '../../services/inference/generator';
import { CompletionsServer } from '../doubles/completions-server';
import { tinyLlama } from '../helpers/model';
import { relativeError } from '../reference/forward';

/**
 * The onnx backend with a generator (an OpenAI-compatible server: here a double over real HTTP
 * that generates with this project's engine on the same tiny model): the text is the server's,
 * the activation is measured here over exactly its tokens, and both equal what this engine
 * makes alone with the same seed. A server of another model is refused at load; bad answers
 * fail their item with a status naming what is wrong.
 */
describe('generation by an OpenAI-compatible server, activations by our prefill', () => {
  let modelDir: string;
  let served: LoadedModel;
  let server: CompletionsServer;
  const outcomes: GeneratorOutcome[] = [];
  const input = (seed: number, maxNewTokens = 12) => ({
    messages: [{ role: 'system', content: 'You are a lighthouse keeper.' }, { role: 'user', content: `Tell me about night ${seed}.` }],
    sampling: { temperature: 0.8, topP: 0.9, maxNewTokens, maxContext: 256, seed: 0, enableThinking: false },
    seed: 1000 + seed,
    layers: [],
  });
  const backend = (generator?: CompletionsGenerator, check: 'greedy' | 'off' = 'greedy') =>
    new OnnxBackend({ modelDirs: [modelDir], model: 'tiny-llama', capacity: 8, device: 'cpu', decode: 'slots', deviceMemory: '4GiB', slotLength: 256, maxBatch: 4, maxBatchTokens: 4096, gatherMs: 1, generator, generatorCheck: check });
  const generator = (url: string, over: Partial<ConstructorParameters<typeof CompletionsGenerator>[0]> = {}) =>
    new CompletionsGenerator({ ...GENERATOR_DEFAULTS, url, model: '', backoffMs: 5, timeoutMs: 2000, onOutcome: (o) => outcomes.push(o), ...over });

  beforeAll(async () => {
    ({ modelDir } = await tinyLlama());
    served = await LoadedModel.load(modelDir, { decode: 'host' });
    server = new CompletionsServer(served);
    await server.start();
  });
  afterAll(async () => {
    await server?.stop();
    await served?.close();
  });

  it('gives the text this engine samples with the same seed, and the activation it measures, through 429, 500, a hang and a cut response', async () => {
    const alone = backend();
    await alone.load();
    const elsewhere = backend(generator(server.baseUrl));
    await elsewhere.load();
    try {
      expect(elsewhere.info.generator).toEqual({ kind: 'openai', url: server.baseUrl, model: 'tiny-served', tokenIdPrompts: true, returnsTokenIds: true });
      server.failNext(1, 429);
      server.failNext(1, 500);
      server.failNext(1, 'hang');
      server.failNext(1, 'cut');
      outcomes.length = 0;
      const seeds = [1, 2, 3, 4, 5, 6];
      const mine = await Promise.all(seeds.map((s) => alone.generate(input(s))));
      const theirs = await Promise.all(seeds.map((s) => elsewhere.generate(input(s))));
      expect(theirs.map((t) => t.text)).toEqual(mine.map((m) => m.text));
      expect(theirs.map((t) => t.responseIds)).toEqual(mine.map((m) => m.responseIds));
      expect(mine.some((m) => m.responseIds!.length > 3)).toBe(true);
      theirs.forEach((t, i) => {
        expect(t.finishReason).toBe(mine[i].finishReason);
        expect(relativeError(t.activation.data, mine[i].activation.data)).toBeLessThanOrEqual(1e-4);
      });
      expect(outcomes.filter((o) => o !== 'ok').sort()).toEqual(['dropped', 'rate_limited', 'server_error', 'timeout']);
      // Text only: the same answer, no activation (the caller measures it after saving it).
      const textOnly = await elsewhere.generate({ ...input(1), textOnly: true });
      expect(textOnly.text).toBe(mine[0].text);
      expect(textOnly.activation.shape).toEqual([0, 64]);
    } finally {
      await alone.close();
      await elsewhere.close();
    }
  });

  it('refuses at load a server of another model, naming both', async () => {
    const other = await tinyLlama({ seed: 9 });
    const otherModel = await LoadedModel.load(other.modelDir, { decode: 'host' });
    const impostor = new CompletionsServer(otherModel);
    await impostor.start();
    try {
      const b = backend(generator(impostor.baseUrl));
      await expect(b.load()).rejects.toThrow(/the generator at .* serves "tiny-served", which is not this replica's model "tiny-llama": asked to continue .* greedily, it answers \[.*\] where this model answers \[.*\] \(token \d+ differs\)/);
      await b.close();
      // The name asked for must be served.
      const named = backend(generator(server.baseUrl, { model: 'llama-70b' }));
      await expect(named.load()).rejects.toThrow(/serves "tiny-served", not --generator-model "llama-70b"/);
      await named.close();
    } finally {
      await impostor.stop();
      await otherModel.close();
    }
  });

  it('fails an item whose answer breaks the API, naming what: ids outside the vocabulary, more tokens than asked; re-tokenizes when no ids come back', async () => {
    const b = backend(generator(server.baseUrl));
    await b.load();
    try {
      server.options.outsideVocabulary = true;
      await expect(b.generate(input(1))).rejects.toMatchObject({ code: 9, message: expect.stringMatching(/^generator: its answer holds token id \d+, outside this model's vocabulary/) });
      server.options.outsideVocabulary = false;
      server.options.extraTokens = 40;
      await expect(b.generate(input(1, 8))).rejects.toMatchObject({ code: 9, message: expect.stringMatching(/^generator: it answered \d+ tokens where at most 8 were asked for/) });
      server.options.extraTokens = 0;
      server.options.returnTokenIds = false;
      const retokenized = await b.generate(input(2));
      expect(retokenized.text.length).toBeGreaterThan(0);
      expect(b.info.generator?.returnsTokenIds).toBe(false);
      // A server that takes no token-id prompts: the rendered text from then on, and GetModelInfo says so.
      server.options.returnTokenIds = true;
      server.options.acceptTokenIds = false;
      const asText = await b.generate(input(3));
      expect(asText.text.length).toBeGreaterThan(0);
      expect(b.info.generator?.tokenIdPrompts).toBe(false);
    } finally {
      server.options.returnTokenIds = true;
      server.options.acceptTokenIds = true;
      await b.close();
    }
  });

  it('does not load with a generator URL that does not answer, or that is not the API, saying which', async () => {
    const closed = backend(generator('http://127.0.0.1:9/v1', { attempts: 2 }));
    await expect(closed.load()).rejects.toThrow(/127\.0\.0\.1:9\/v1\/models: fetch failed .* \(after 2 attempts\)/);
    await closed.close();
    const notApi = backend(generator(server.baseUrl.replace(/\/v1$/, '')));
    await expect(notApi.load()).rejects.toThrow(/404 .* from http:\/\/127\.0\.0\.1:\d+\/models/);
    await notApi.close();
  });
});
