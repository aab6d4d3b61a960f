import { CalibrationError, defaultBands, parseBands } from '../../services/cli/calibrate';

describe('the layer bands of a calibration', () => {
  it('covers the upper half at an eighth and a quarter of the depth, with the paper\'s bands for its models', () => {
    const qwen = defaultBands('Qwen/Qwen3-32B', 64);
    expect(qwen).toContainEqual([46, 54]);
    expect(qwen).toContainEqual([32, 40]);
    expect(qwen).toContainEqual([48, 64]);
    expect(qwen.every(([a, b]) => a >= 32 && b <= 64 && [8, 16].includes(b - a))).toBe(true);
    const llama = defaultBands('meta-llama/Llama-3.3-70B-Instruct', 80);
    expect(llama).toContainEqual([56, 72]);
    expect(llama.every(([a, b]) => a >= 40 && b <= 80)).toBe(true);
    // Another model of 64 layers gets the grid without the paper's band.
    expect(defaultBands('other', 64)).not.toContainEqual([46, 54]);
    expect(new Set(qwen.map(String)).size).toBe(qwen.length);
  });

  it('takes bands as first:end and refuses others naming the flag', () => {
    expect(parseBands('46:54, 56:72', 80)).toEqual([[46, 54], [56, 72]]);
    expect(() => parseBands('46-54', 80)).toThrow(new CalibrationError('--layer-ranges: "46-54" is not first:end'));
    expect(() => parseBands('70:90', 80)).toThrow("--layer-ranges: 70:90 is not a band of the model's layers 0..80 (end excluded)");
  });
});
