import { DecoderBuilder } from './decoder';

/** Llama (Llama 3.x): the shared decoder as it is. */
export class LlamaBuilder extends DecoderBuilder {}
