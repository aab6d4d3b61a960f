import { Run, RunState } from '../../gen/assistant_axis/v1/coordinator';
import { setImmediate as yieldToEvents } from 'node:timers/promises';
import { estimateJudgeCost, judgePrompt } from '../contracts/judge';
import { JUDGE_MAX_TOKENS } from '../shared/defaults';
import type { DataSet } from './data';
import type { RunSpec } from './ledgerRows';
import { JudgeTokenCounter } from './judgeTokens';
import { specFields } from './runSpec';
import { emptyProgress } from './progress';
import type { ImportedItem } from './referenceImport';
import { judgeLabel, Upstreams } from './upstreams';

/**
 * What a run would send to the judge and cost, with nothing generated, judged or written.
 * Answers are not known yet: each is counted at max_new_tokens, so the estimate is an upper bound.
 * An import counts its real answers (with the judge's tokenizer, yielding to other calls as it
 * goes: an import of many unscored answers takes about a second per 2 MB of text), and judge
 * prompts only for items without a score.
 */
export async function dryRunView(spec: RunSpec, data: DataSet, upstreams: Upstreams, outputDir: string, imported?: ImportedItem[]): Promise<Run> {
  const info = upstreams.judge.info!;
  let items = 0;
  let prompts = 0;
  let promptTokens = 0;
  let sample = '';
  const counter = new JudgeTokenCounter();
  // An import: its items, and judge prompts (with the real answers) only for those without a score.
  const roles = imported ? [] : data.roles;
  if (imported) {
    const byName = new Map(data.roles.map((r) => [r.name, r]));
    items = imported.length;
    for (const it of imported) {
      const evalPrompt = byName.get(it.role)?.evalPrompt;
      if (!evalPrompt || it.score !== undefined) continue;
      sample ||= judgePrompt(evalPrompt, data.questions[it.q].question, it.text);
      promptTokens += counter.prompt(evalPrompt, data.questions[it.q].question, JudgeTokenCounter.count(it.text));
      prompts++;
      if (prompts % 500 === 0) await yieldToEvents();
    }
  }
  for (const role of roles) {
    items += role.instructions.length * data.questions.length;
    if (!role.evalPrompt) continue;
    for (const q of data.questions) {
      sample ||= judgePrompt(role.evalPrompt, q.question, `<the model's answer, up to ${spec.maxNewTokens} tokens>`);
      promptTokens += role.instructions.length * counter.prompt(role.evalPrompt, q.question, spec.maxNewTokens);
      prompts += role.instructions.length;
    }
  }
  const completionTokens = prompts * JUDGE_MAX_TOKENS;
  const cost = estimateJudgeCost(info, promptTokens, prompts, !!spec.judgeBatch);
  return {
    name: spec.name,
    state: RunState.RUN_STATE_UNSPECIFIED,
    progress: { ...emptyProgress(data.roles.length), itemsTotal: items, toJudge: prompts },
    model: spec.model,
    backend: upstreams.inference.replicas.find((r) => r.info?.model === spec.model)?.info?.backend ?? '',
    judge: judgeLabel(upstreams),
    outputDir,
    error: '',
    message: 'dry run: nothing was generated, judged or written',
    summary: undefined,
    createTime: new Date(),
    endTime: undefined,
    minCount: spec.minCount,
    questionCount: spec.questionCount,
    roles: spec.roles,
    sampling: { temperature: spec.temperature, topP: spec.topP, maxNewTokens: spec.maxNewTokens, maxContext: spec.maxContext, seed: spec.seed, enableThinking: !!spec.enableThinking },
    dryRun: {
      items,
      judgePrompts: prompts,
      samplePrompt: sample,
      estimatedPromptTokens: promptTokens,
      estimatedCompletionTokens: completionTokens,
      estimatedCostUsd: cost,
      judgeModel: info.model,
      judgeHasPrice: info.hasPrice,
      note: `${spec.judgeBatch ? 'Batch API prices (half the online price); ' : ''}${imported ? 'imported answers counted as they are' : `an upper bound: each answer counted at max_new_tokens (${spec.maxNewTokens})`}, prompt tokens counted with o200k_base (the tokenizer of gpt-4o, gpt-4.1, gpt-5; for other judge models an estimate), at most ${JUDGE_MAX_TOKENS} completion tokens per prompt, no retries${info.hasPrice ? '' : '; the judge has no price for its model, so the cost is 0'}`,
    },
    maxJudgeCostUsd: spec.maxJudgeCostUsd,
    ...specFields(spec),
  };
}
