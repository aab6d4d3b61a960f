import { createHash } from 'node:crypto';
import type { ChatMessage } from '../../gen/assistant_axis/v1/common';
import type { GetModelInfoResponse } from '../../gen/assistant_axis/v1/inference';
import type { Logger } from '../shared/logger';
import type { ChangeSignal } from './changes';
import { buildConversation } from './conversation';
import type { DataSet, Role } from './data';
import type { Ledger } from './ledger';
import type { ItemRow, RunSpec } from './ledgerRows';
import type { RunProgress } from './progress';
import type { Upstreams } from './upstreams';

/** What every part of one run's execution shares: its spec and data, where it records and sends, and how it stops. */
export interface RunContext {
  readonly spec: RunSpec;
  readonly data: DataSet;
  readonly ledger: Ledger;
  readonly upstreams: Upstreams;
  readonly runDir: string;
  readonly log: Logger;
  readonly progress: RunProgress;
  readonly changes: ChangeSignal;
  /** The run's items and their conversations (known once a replica of the model has answered). */
  readonly items: RunItems;
  /** Cancelled, failed or paused: no new item starts. */
  stopping(): boolean;
  /** Retries `fn` while its upstream passes through trouble (see retry.ts). */
  retrying<T>(what: string, fn: () => Promise<T>): Promise<T>;
  /** Tells the run's watchers that its progress moved. */
  reportProgress(): void;
  /** Stops the run taking items, resumable by StartRun (the spending cap). */
  pause(reason: string): void;
}

/** Seed of one item: a pure function of the run's seed and the item, so a retry samples the same text. */
export function itemSeed(runSeed: number, role: string, key: string): number {
  return createHash('sha256').update(`${runSeed}:${role}:${key}`).digest().readUIntLE(0, 6);
}

/** The run's activation shape [layers, hidden]: the layers it captures (all when none are named), the model's hidden size. */
export function activationShape(ctx: Pick<RunContext, 'spec' | 'items'>): [number, number] {
  return [ctx.spec.layers.length || ctx.items.modelInfo.numLayers, ctx.items.modelInfo.hiddenSize];
}

/** The id an item travels under to inference and the judge: `run/role/key`. */
export function itemId(run: string, item: { role: string; key: string }): string {
  return `${run}/${item.role}/${item.key}`;
}

/** A run's items as the upstreams see them: their ids, and the conversation each is (docs/CONCEPTS.md, "Items"). */
export class RunItems {
  private readonly rolesByName: Map<string, Role>;
  private model: GetModelInfoResponse | undefined;

  constructor(private readonly spec: RunSpec, private readonly data: DataSet, private readonly ledger: Ledger) {
    this.rolesByName = new Map(data.roles.map((r) => [r.name, r]));
  }

  /** The model's info decides how the system prompt is rendered; set once a replica has answered. */
  setModel(info: GetModelInfoResponse): void {
    this.model = info;
  }

  get modelInfo(): GetModelInfoResponse {
    if (!this.model) throw new Error('the model is not known yet');
    return this.model;
  }

  id(item: ItemRow): string {
    return itemId(this.spec.name, item);
  }

  /** The ledger's item behind an id (`run/role/key`), if it is one of this run's. */
  byId(id: string): ItemRow | undefined {
    const prefix = `${this.spec.name}/`;
    if (!id.startsWith(prefix)) return undefined;
    const rest = id.slice(prefix.length);
    const slash = rest.lastIndexOf('/');
    return slash > 0 ? this.ledger.item(this.spec.name, rest.slice(0, slash), rest.slice(slash + 1)) : undefined;
  }

  evalPrompt(role: string): string | undefined {
    return this.rolesByName.get(role)?.evalPrompt;
  }

  conversation(item: ItemRow): { systemPrompt: string; question: string; messages: ChatMessage[] } {
    const role = this.rolesByName.get(item.role)!;
    const question = this.data.questions[item.questionIndex].question;
    const { systemPrompt, messages } = buildConversation(role.instructions[item.promptIndex], question, {
      shortName: this.modelInfo.modelShortName,
      supportsSystemPrompt: this.modelInfo.supportsSystemPrompt,
    });
    return { systemPrompt, question, messages };
  }

  /** The answer's text: the one the row carries, else the ledger's (the scheduler's pages carry none). */
  text(item: ItemRow): string {
    return item.text ?? this.ledger.itemText(this.spec.name, item.role, item.key) ?? '';
  }
}
