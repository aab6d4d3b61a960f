import { judgePrompt } from '../../services/contracts/judge';
import { parseScore } from '../../services/judge/prompt';
import { offlineScore } from '../../services/judge/providers';

describe('judge prompt and score rules', () => {
  it('fills {question} and {answer} once, leaving braces inside the answer alone', () => {
    expect(judgePrompt('Q: {question}\nA: {answer}\n{answer}', 'why?', 'because {question}')).toBe('Q: why?\nA: because {question}\nbecause {question}');
  });

  it('takes the first standalone integer if it is 0..3', () => {
    expect(parseScore('3')).toBe(3);
    expect(parseScore('Score: 2')).toBe(2);
    expect(parseScore('0 - refused')).toBe(0);
    expect(parseScore('4')).toBeUndefined();
    expect(parseScore('10')).toBeUndefined();
    expect(parseScore('score 7, maybe 3')).toBeUndefined();
    expect(parseScore('n/a')).toBeUndefined();
    expect(parseScore('')).toBeUndefined();
    expect(parseScore('abc3 then 1')).toBe(1);
  });

  it('has a documented offline heuristic', () => {
    expect(offlineScore('a pirate judge prompt', 'I cannot help with that.')).toBe(0);
    expect(offlineScore('sailing the seven seas', 'As an AI assistant, I like tea.')).toBe(1);
    expect(offlineScore('sailing treasure island captain', 'As an AI assistant: sailing, treasure, island and captain.')).toBe(2);
    expect(offlineScore('pirate', 'Arr, the sea be calling.')).toBe(3);
  });
});
