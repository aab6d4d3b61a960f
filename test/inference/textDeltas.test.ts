import * as fs from 'node:fs';
import * as path from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { textDeltas } from '../../services/inference/onnx/generate';
import { writeTinyCheckpoint } from '../../services/model/tiny';
import { tempDir } from '../kit/files';

/**
 * A streamed answer's pieces, decoded a few tokens at a time, must add up to the whole answer's
 * decoding at every token (no piece early, none lost, none twice), for a byte-level BPE (the
 * tiny models', multi-byte characters split across tokens) and for a SentencePiece decoder that
 * strips the text's leading space (Llama 2's), where decoding a window alone differs from
 * decoding it in place; and the work must grow with the answer's length, not its square.
 */
function llama2StyleTokenizer(): Tokenizer {
  // Pieces with the word marker, and byte fallback for what they do not cover (é, ✓, 🌊 as UTF-8 bytes).
  const pieces = ['<unk>', '<s>', '</s>', '▁', '▁the', '▁sea', 's', '▁at', '▁night', ',', '.', '▁boats', 'a', 'b', '▁'.repeat(2)];
  const vocab: Record<string, number> = {};
  pieces.forEach((p, i) => (vocab[p] = i));
  for (let b = 0; b < 256; b++) vocab[`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`] = pieces.length + b;
  const json = {
    version: '1.0',
    added_tokens: [
      { id: 0, content: '<unk>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
      { id: 1, content: '<s>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
      { id: 2, content: '</s>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
    ],
    normalizer: null,
    pre_tokenizer: null,
    post_processor: null,
    decoder: {
      type: 'Sequence',
      decoders: [{ type: 'Replace', pattern: { String: '▁' }, content: ' ' }, { type: 'ByteFallback' }, { type: 'Fuse' }, { type: 'Strip', content: ' ', start: 1, stop: 0 }],
    },
    model: { type: 'BPE', dropout: null, unk_token: '<unk>', continuing_subword_prefix: null, end_of_word_suffix: null, fuse_unk: true, byte_fallback: true, vocab, merges: [] },
  };
  return new Tokenizer(json as never, {});
}

describe('textDeltas', () => {
  let byteLevel: Tokenizer;
  beforeAll(async () => {
    const dir = tempDir('text-deltas');
    await writeTinyCheckpoint({ arch: 'llama', out: dir, seed: 1, merges: 2000 });
    byteLevel = new Tokenizer(JSON.parse(fs.readFileSync(path.join(dir, 'tokenizer.json'), 'utf8')), {});
  });

  const sentencePiece = llama2StyleTokenizer();
  const cases: [string, () => { tokenizer: Tokenizer; text: string }][] = [
    ['byte-level BPE', () => ({ tokenizer: byteLevel, text: 'The sea at night: ☀️ boats, naïve café — 漢字 and 🌊🌊 waves.\n\nNext line  with  spaces ✓' })],
    ['SentencePiece that strips the leading space', () => ({ tokenizer: sentencePiece, text: ' the sea at night, the boats. é✓🌊 the  sea.' })],
  ];

  it.each(cases)('%s: the pieces add up to the decoded answer at every token, and the decoding is linear in its length', (_name, make) => {
    const { tokenizer, text } = make();
    const ids = Array.from(tokenizer.encode(text, { add_special_tokens: false }).ids as ArrayLike<number>, Number);
    expect(ids.length).toBeGreaterThan(20);
    const whole = (n: number) => tokenizer.decode(ids.slice(0, n), { skip_special_tokens: true });
    expect(whole(ids.length)).toBe(tokenizer.decode(ids, { skip_special_tokens: true }));
    let decoded = 0;
    const model = {
      decode: (part: number[]) => {
        decoded += part.length;
        return tokenizer.decode(part, { skip_special_tokens: true });
      },
    };
    // The answer repeated 20 times: long enough that decoding the whole text each time would show.
    const answer = Array.from({ length: 20 }, () => ids).flat();
    const full = (n: number) => tokenizer.decode(answer.slice(0, n), { skip_special_tokens: true });
    let streamed = '';
    const stream = textDeltas(model, (delta) => void (streamed += delta));
    answer.forEach((id, k) => {
      stream.onToken(id);
      const sofar = full(k + 1);
      // What was sent is the decoded text so far, or all of it but an incomplete last character.
      expect(sofar.startsWith(streamed)).toBe(true);
      if (!sofar.endsWith('\uFFFD')) expect(streamed).toBe(sofar);
    });
    stream.finish(full(answer.length));
    expect(streamed).toBe(full(answer.length));
    // Two short windows a token: a few tokens each, not the whole answer (n^2 / 2 would be ~10^6 here).
    expect(decoded).toBeLessThan(8 * answer.length);
  });

  it('ends the answer when the listener says so, and a failing listener does not stop it', () => {
    let pieces = 0;
    const stop = textDeltas({ decode: (ids) => ids.map((i) => String.fromCharCode(97 + i)).join('') }, () => ++pieces === 3);
    expect([0, 1, 2, 3].map((id) => stop.onToken(id))).toEqual([false, false, true, true]);
    const failing = textDeltas({ decode: (ids) => ids.map((i) => String.fromCharCode(97 + i)).join('') }, () => {
      throw new Error('client gone');
    });
    expect([0, 1].map((id) => failing.onToken(id))).toEqual([false, false]);
  });
});
