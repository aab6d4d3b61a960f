import { Dtype } from '../../gen/assistant_axis/v1/common';
import { createBackend } from '../../services/inference/backends';
import { parseCudaOptions } from '../../services/inference/onnx';
import { INFERENCE_OPTIONS } from '../../services/inference/options';
import { SyntheticBackend } from '../../services/inference/synthetic';
import { loadConfig } from '../../services/shared/config';
import { validateExtract, validateGenerate } from '../../services/inference/validate';

const backend = new SyntheticBackend({ model: 'synthetic-tiny', numLayers: 4, hidden: 8, tokensPerSecond: 0, capacity: 2, supportsSystemPrompt: true });
const messages = [
  { role: 'system', content: 'You are a lighthouse keeper.' },
  { role: 'user', content: 'What do you do at night?' },
];
const sampling = { temperature: 0.7, topP: 0.9, maxNewTokens: 512, maxContext: 2048, seed: 0, enableThinking: false };

describe('synthetic backend', () => {
  it('gives the same text for the same seed and another for another seed', async () => {
    const a = await backend.generate({ messages, sampling, seed: 1, layers: [] });
    const b = await backend.generate({ messages, sampling, seed: 1, layers: [] });
    const c = await backend.generate({ messages, sampling, seed: 2, layers: [] });
    expect(a.text).toBe(b.text);
    expect(a.text).not.toBe(c.text);
    expect(a.activation.shape).toEqual([4, 8]);
  });

  it('returns by Extract exactly the activation Generate returned', async () => {
    const g = await backend.generate({ messages, sampling, seed: 5, layers: [] });
    const e = await backend.extract([...messages, { role: 'assistant', content: g.text }], []);
    expect([...e.activation.data]).toEqual([...g.activation.data]);
    expect(e.responseTokens).toBe(g.completionTokens);
  });

  it('keeps only the chosen layers, in the order asked', async () => {
    const all = await backend.generate({ messages, sampling, seed: 5, layers: [] });
    const some = await backend.generate({ messages, sampling, seed: 5, layers: [3, 1] });
    expect(some.activation.shape).toEqual([2, 8]);
    expect([...some.activation.data.subarray(0, 8)]).toEqual([...all.activation.data.subarray(24, 32)]);
    expect([...some.activation.data.subarray(8, 16)]).toEqual([...all.activation.data.subarray(8, 16)]);
  });

  it('stops at max_new_tokens with finish reason "length"', async () => {
    const r = await backend.generate({ messages, sampling: { ...sampling, maxNewTokens: 3 }, seed: 1, layers: [] });
    expect(r.completionTokens).toBe(3);
    expect(r.finishReason).toBe('length');
  });

  it('reports its model info', () => {
    expect(backend.info).toMatchObject({ backend: 'synthetic', numLayers: 4, hiddenSize: 8, capacity: 2, activationDtype: Dtype.DTYPE_F32, modelShortName: 'Synthetic' });
  });
});

describe('inference request checks name the field', () => {
  const info = backend.info;
  const ok = { itemId: 'i', messages, sampling, seed: 0, layers: [] };
  it.each([
    ['empty item_id', { ...ok, itemId: '' }, /item_id: required/],
    ['no messages', { ...ok, messages: [] }, /messages: at least one/],
    ['unknown message role', { ...ok, messages: [{ role: 'wizard', content: 'x' }] }, /messages\[0\]\.role/],
    ['conversation not ending with the user', { ...ok, messages: [...messages, { role: 'assistant', content: 'x' }] }, /last message must be the user turn/],
    ['negative temperature', { ...ok, sampling: { ...sampling, temperature: -1 } }, /sampling.temperature/],
    ['top_p 0', { ...ok, sampling: { ...sampling, topP: 0 } }, /sampling.top_p/],
    ['max_new_tokens 0', { ...ok, sampling: { ...sampling, maxNewTokens: 0 } }, /sampling.max_new_tokens/],
    ['layer out of range', { ...ok, layers: [4] }, /layers: layer 4 does not exist/],
    ['repeated layer', { ...ok, layers: [1, 1] }, /listed twice/],
    ['max_context above any model\'s', { ...ok, sampling: { ...sampling, maxContext: 131_073 } }, /sampling.max_context: must be in \[2, 131072\]/],
    ['max_context 0', { ...ok, sampling: { ...sampling, maxContext: 0 } }, /sampling.max_context/],
    // 64 characters a token at most: 2048 tokens hold 131,072 characters; one more cannot fit, and is refused untokenized.
    ['a conversation longer than max_context can hold', { ...ok, messages: [{ role: 'user', content: 'a'.repeat(2048 * 64 + 1) }], sampling: { ...sampling, maxContext: 2048 } }, /messages: 131073 characters cannot fit max_context \(2048 tokens/],
  ])('%s', (_label, req, message) => {
    expect(() => validateGenerate(req as never, info)).toThrow(message);
  });

  it('wants Extract conversations to end with the answer', () => {
    expect(() => validateExtract({ itemId: 'i', messages, layers: [], responseTokenIds: [], enableThinking: false, cappingExperiment: '' }, info)).toThrow(/last message must be the assistant answer/);
  });

  it('refuses an Extract conversation longer than a slot can hold before tokenizing it, and takes one that may fit', () => {
    const planned = { ...info, slotLength: 100 };
    const conversation = (chars: number) => [{ role: 'user', content: 'q' }, { role: 'assistant', content: 'b'.repeat(chars) }];
    const req = (chars: number) => ({ itemId: 'i', messages: conversation(chars), layers: [], responseTokenIds: [], enableThinking: false, cappingExperiment: '' });
    expect(() => validateExtract(req(100 * 64), planned)).toThrow(/messages: 6401 characters cannot fit a slot \(--slot-length\) \(100 tokens/);
    expect(() => validateExtract(req(100 * 64 - 1), planned)).not.toThrow();
  });
});

describe('the onnx backend\'s options', () => {
  // Checked when the backend is made, before any model is read: the message names the flag.
  const make = (...argv: string[]) => () => createBackend(loadConfig('inference', INFERENCE_OPTIONS, ['--backend', 'onnx', '--model-dir', '/nonexistent', ...argv], {}));
  it('names the slot policy, decode mode and batch size it refuses, and takes the known ones', () => {
    expect(make('--slot-policy', 'lifo')).toThrow('--slot-policy must be one of fifo, chat-first, got lifo');
    expect(make('--slot-policy', 'chat-first', '--chat-slots', '1.5')).toThrow('--chat-slots must be a whole number >= 0, got 1.5');
    expect(make('--slot-policy', 'chat-first', '--chat-slots', '3')()).toBeDefined();
    expect(make('--step-runtime', 'cuda')).toThrow('--step-runtime must be auto, native or stock, got cuda');
    expect(make('--decode', 'fast')).toThrow('--decode must be auto, slots, loop or host, got fast');
    expect(make('--max-batch', '0')).toThrow('--max-batch must be a whole number >= 1, got 0');
    expect(make('--slot-policy', 'fifo', '--decode', 'slots')()).toBeDefined();
  });

  it('takes CUDA provider options as key=value pairs, refusing another form or device_id by name', () => {
    expect(parseCudaOptions('enable_cuda_graph=0, gpu_mem_limit=1000000')).toEqual({ enable_cuda_graph: '0', gpu_mem_limit: '1000000' });
    expect(parseCudaOptions('')).toEqual({});
    expect(make('--cuda-options', 'gpu_mem_limit')).toThrow(/--cuda-options: "gpu_mem_limit" is not key=value/);
    expect(make('--cuda-options', 'arena=$(reboot)')).toThrow(/--cuda-options: "arena=\$\(reboot\)" is not key=value/);
    expect(make('--cuda-options', 'device_id=1')).toThrow('--cuda-options: device_id is set by --device (cuda:N)');
    expect(make('--cuda-options', 'enable_cuda_graph=0')()).toBeDefined();
  });
});
