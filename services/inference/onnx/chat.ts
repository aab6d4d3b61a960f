import { Template } from '@huggingface/jinja';
import type { ChatMessage } from '../../../gen/assistant_axis/v1/common';

const MARKER = 'axis-system-marker-7f3a';

/** A model's chat template (Jinja, from tokenizer_config.json), rendered as transformers does. */
export class ChatTemplate {
  private readonly template: Template;

  constructor(readonly source: string, private readonly specials: { bos_token?: string; eos_token?: string }) {
    this.template = new Template(source);
  }

  /** `enableThinking`: Qwen 3's switch, off unless asked for (docs/CONCEPTS.md); templates without it ignore it. */
  render(messages: ChatMessage[], addGenerationPrompt: boolean, enableThinking = false): string {
    return this.template.render({
      messages: messages.map((m) => ({ role: m.role, content: m.content })),
      add_generation_prompt: addGenerationPrompt,
      bos_token: this.specials.bos_token ?? '',
      eos_token: this.specials.eos_token ?? '',
      enable_thinking: enableThinking,
      // raise_exception is built into @huggingface/jinja and throws, as transformers' does.
    });
  }

  /**
   * Whether the template renders a system message: render one holding a marker and look for
   * the marker (docs/CONCEPTS.md). A template that raises on a system message renders none.
   */
  supportsSystemPrompt(): boolean {
    try {
      return this.render([{ role: 'system', content: MARKER }, { role: 'user', content: 'hi' }], true).includes(MARKER);
    } catch {
      return false;
    }
  }
}
