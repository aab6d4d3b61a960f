import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import type { ChatMessage, Tensor } from '../../gen/assistant_axis/v1/common';
import { Dtype } from '../../gen/assistant_axis/v1/common';
import { exists, writeFileAtomic } from '../shared/files';
import { isDefaultRole } from '../shared/names';
import { writeSafetensorsStreaming } from '../shared/safetensors';
import { decodeTensor, encodeTensor } from '../shared/tensor';
import type { ItemRow, RoleCounts } from './ledgerRows';
import { RunFailure } from './retry';
import { activationShape, RunContext } from './runContext';

/** One line of `responses/<role>.jsonl`, exactly the reference pipeline's fields. */
export interface ResponseRecord {
  system_prompt: string;
  prompt_index: number;
  question_index: number;
  question: string;
  conversation: ChatMessage[];
  label: 'pos';
}

export function responseRecord(systemPrompt: string, promptIndex: number, questionIndex: number, question: string, messages: ChatMessage[], answer: string): ResponseRecord {
  return {
    system_prompt: systemPrompt,
    prompt_index: promptIndex,
    question_index: questionIndex,
    question,
    conversation: [...messages.map((m) => ({ role: m.role, content: m.content })), { role: 'assistant', content: answer }],
    label: 'pos',
  };
}

/**
 * Writes a finished role's reference-format files, each atomically and in (prompt, question)
 * order: `responses/<role>.jsonl` and, for judged roles, `scores/<role>.json` = {key: score}
 * holding the items the judge scored.
 */
export async function writeRoleFiles(runDir: string, role: string, items: ItemRow[], record: (item: ItemRow) => ResponseRecord): Promise<void> {
  const lines = items.map((it) => JSON.stringify(record(it))).join('\n') + '\n';
  await writeFileAtomic(path.join(runDir, 'responses', `${role}.jsonl`), lines);
  if (!isDefaultRole(role)) {
    const scores: Record<string, number> = {};
    for (const it of items) if (it.score !== null) scores[it.key] = it.score;
    await writeFileAtomic(path.join(runDir, 'scores', `${role}.json`), JSON.stringify(scores, null, 2) + '\n');
  }
}

/**
 * Which roles are finished and written. A role's files are written once, when its last item is
 * done (or at the start of a pass, for roles a crash finished without writing them), and never
 * again: results are not overwritten. With archiveActivations, each item's activation is staged
 * (bf16) until its role's archive is written.
 */
export class RoleCompletion {
  /** Items not yet done, per role with any. */
  private readonly remaining = new Map<string, number>();
  private written = new Set<string>();

  constructor(private readonly ctx: RunContext) {}

  /** A new pass: what the ledger says is left and written; writes the roles finished but not written. */
  async startPass(counts: RoleCounts[]): Promise<void> {
    const { ctx } = this;
    this.written = ctx.ledger.writtenRoles(ctx.spec.name);
    this.remaining.clear();
    for (const c of counts) if (c.done < c.total) this.remaining.set(c.role, c.total - c.done);
    for (const role of ctx.data.roles.map((r) => r.name)) {
      if (!this.remaining.has(role) && !this.written.has(role)) await this.write(role);
    }
  }

  get writtenCount(): number {
    return this.written.size;
  }

  /** One more item of `role` done: its files are written when it was the last. */
  async itemDone(role: string): Promise<void> {
    const left = (this.remaining.get(role) ?? 1) - 1;
    this.remaining.set(role, left);
    if (left === 0) {
      this.remaining.delete(role);
      if (!this.written.has(role)) await this.write(role);
    }
  }

  /** Stages an item's activation for its role's archive (before aggregation acknowledges it). */
  async stage(item: ItemRow, activation: Tensor): Promise<void> {
    if (this.ctx.spec.archiveActivations) await writeFileAtomic(this.stagingFile(item), encodeTensor(decodeTensor(activation, `activation of item ${this.ctx.items.id(item)}`), Dtype.DTYPE_BF16).data);
  }

  private stagingFile(item: ItemRow): string {
    return path.join(this.ctx.runDir, 'activations', '.staging', item.role, `${item.key}.bf16`);
  }

  private async write(role: string): Promise<void> {
    const { ctx } = this;
    const items = ctx.ledger.roleItems(ctx.spec.name, role);
    if (ctx.spec.archiveActivations) await this.writeArchive(role, items);
    await writeRoleFiles(ctx.runDir, role, items, (it) => {
      const { systemPrompt, question, messages } = ctx.items.conversation(it);
      return responseRecord(systemPrompt, it.promptIndex, it.questionIndex, question, messages, it.text ?? '');
    });
    ctx.ledger.markRoleWritten(ctx.spec.name, role);
    if (ctx.spec.archiveActivations) {
      const staging = path.join(ctx.runDir, 'activations', '.staging');
      await fs.rm(path.join(staging, role), { recursive: true, force: true });
      await fs.rmdir(staging).catch(() => undefined); // gone once the last role is written
    }
    this.written.add(role);
    ctx.progress.roleWritten();
    ctx.log.info({ role }, 'role complete: files written');
  }

  /** activations/<role>.safetensors from the role's staged activations, streamed, in (prompt, question) order. */
  private async writeArchive(role: string, items: ItemRow[]): Promise<void> {
    const { ctx } = this;
    const [L, d] = activationShape(ctx);
    const parts = items.map((it) => ({
      name: it.key,
      dtype: 'BF16' as const,
      shape: [L, d],
      byteLength: L * d * 2,
      read: async () => {
        try {
          return await fs.readFile(this.stagingFile(it));
        } catch {
          throw new RunFailure(`archive: the staged activation of ${role}/${it.key} is missing (${this.stagingFile(it)})`);
        }
      },
    }));
    const file = path.join(ctx.runDir, 'activations', `${role}.safetensors`);
    // Written whole by rename: one that exists is complete (a restart between it and the role's mark).
    if (await exists(file)) return;
    await writeSafetensorsStreaming(file, parts, { run: ctx.spec.name, role, model: ctx.spec.model, layers: ctx.spec.layers.length ? ctx.spec.layers.join(',') : 'all' });
  }
}
