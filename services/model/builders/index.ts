import type { CheckpointReader, HfConfig } from '../checkpoint';
import { CheckpointError } from '../checkpoint';
import type { GraphBuilder } from '../graph';
import type { BuilderOptions, DecoderBuilder } from './decoder';
import { Gemma2Builder } from './gemma';
import { LlamaBuilder } from './llama';
import { Qwen2Builder, Qwen3Builder } from './qwen';

type BuilderClass = new (config: HfConfig, ckpt: CheckpointReader, g: GraphBuilder, opts?: BuilderOptions) => DecoderBuilder;

/** One builder per architecture (`model_type` in config.json). */
export const BUILDERS: Record<string, BuilderClass> = {
  llama: LlamaBuilder,
  qwen2: Qwen2Builder,
  qwen3: Qwen3Builder,
  gemma2: Gemma2Builder,
};

export function builderFor(config: HfConfig, ckpt: CheckpointReader, g: GraphBuilder, opts?: BuilderOptions): DecoderBuilder {
  const Builder = BUILDERS[config.model_type];
  if (!Builder) throw new CheckpointError(`config.json: model_type ${JSON.stringify(config.model_type)} is not supported (supported: ${Object.keys(BUILDERS).join(', ')})`);
  return new Builder(config, ckpt, g, opts);
}
