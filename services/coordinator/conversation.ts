import type { ChatMessage } from '../../gen/assistant_axis/v1/common';

/**
 * The conversation of one item (docs/CONCEPTS.md): `{model_name}` filled in; the instruction
 * as a system message when the chat template renders one (omitted when empty), otherwise
 * folded into the user turn as instruction + blank line + question.
 */
export function buildConversation(instruction: string, question: string, model: { shortName: string; supportsSystemPrompt: boolean }): { systemPrompt: string; messages: ChatMessage[] } {
  const systemPrompt = instruction.replaceAll('{model_name}', model.shortName);
  if (model.supportsSystemPrompt) {
    const messages: ChatMessage[] = systemPrompt ? [{ role: 'system', content: systemPrompt }] : [];
    messages.push({ role: 'user', content: question });
    return { systemPrompt, messages };
  }
  return { systemPrompt, messages: [{ role: 'user', content: systemPrompt ? `${systemPrompt}\n\n${question}` : question }] };
}
