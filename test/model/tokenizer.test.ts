import { Tokenizer } from '@huggingface/tokenizers';
import { byteLevelBpe } from '../../services/model/tokenizer';
// eslint-disable-next-line @typescript-eslint/no-require-imports
const gpt2 = require('gpt-3-encoder') as { encode(text: string): number[] };

const TEXTS = ['Hello world', "You are a lighthouse keeper. What's the weather like tonight?", '  leading spaces and trailing  ', 'naïve café — 23 émojis 🎉', 'line\nbreaks\n\n and\ttabs'];

describe('byte-level BPE tokenizer.json from GPT-2', () => {
  it('with every merge, encodes exactly as GPT-2 does', () => {
    const { tokenizer } = byteLevelBpe('all', ['<|endoftext|>']);
    const t = new Tokenizer(tokenizer, {});
    for (const text of TEXTS) expect(t.encode(text, { add_special_tokens: false }).ids).toEqual(gpt2.encode(text));
  });

  it('with the first N merges, still round-trips any text and keeps special tokens whole', () => {
    const { tokenizer, vocabSize, specialIds } = byteLevelBpe(2000, ['<|eot_id|>']);
    expect(vocabSize).toBe(256 + 2000 + 1);
    const t = new Tokenizer(tokenizer, {});
    for (const text of TEXTS) {
      const ids = t.encode(text, { add_special_tokens: false }).ids;
      expect(Math.max(...ids)).toBeLessThan(2256);
      expect(t.decode(ids, { skip_special_tokens: false })).toBe(text);
    }
    expect(t.encode('hi<|eot_id|>', { add_special_tokens: false }).ids).toContain(specialIds['<|eot_id|>']);
  });
});
