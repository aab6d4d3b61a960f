import { exitCodeOf, requestFromFlags, UsageError } from '../../services/cli/axis';

/** `axis run`'s flags as the StartRun request, and the exit code a script reads from a run's end. */
describe('axis run for scripts', () => {
  it('passes the sampling flags the API has, and refuses what is not a number, naming the flag', () => {
    const req = requestFromFlags('r', { temperature: '0.3', 'top-p': '0.95', 'max-context': '2048', 'max-new-tokens': '64', 'compare-axis': '/data/axes/published.safetensors', 'compare-run': 'uncapped' });
    expect(req).toMatchObject({ name: 'r', temperature: 0.3, topP: 0.95, maxContext: 2048, maxNewTokens: 64, compareAxis: '/data/axes/published.safetensors', compareRun: 'uncapped' });
    // Left out: the coordinator's defaults (undefined, not 0).
    expect(requestFromFlags('r', {})).toMatchObject({ temperature: undefined, topP: undefined, maxContext: undefined, compareAxis: '' });
    expect(() => requestFromFlags('r', { temperature: 'hot' })).toThrow(new UsageError('--temperature must be a number, got "hot"'));
    expect(() => requestFromFlags('r', { 'top-p': '0.9x' })).toThrow('--top-p must be a number, got "0.9x"');
    expect(() => requestFromFlags('r', { 'max-context': '4k' })).toThrow('--max-context must be a whole number, got "4k"');
  });

  it('exits 0 only for a run that SUCCEEDED, with a code of its own for each other end', () => {
    expect(['SUCCEEDED', 'FAILED', 'PAUSED', 'CANCELLED', 'RUNNING'].map(exitCodeOf)).toEqual([0, 3, 4, 5, 1]);
  });
});
