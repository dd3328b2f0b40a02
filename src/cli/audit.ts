import { eq } from 'drizzle-orm';
import { auditRecords } from '../db/schema/index.ts';
import { auditView } from '../http/privacy.ts';
import { ApiError } from '../lib/errors.ts';
import { verifyChains, type WorkspaceChainReport } from '../privacy/audit-chain.ts';
import { output, parse, requireWorkspace, withDeps, type Command } from './shared.ts';

const show: Command = async (cli, args) => {
  const { ids } = parse('audit show', args, {}, ['auditRecordId']);
  const row = await withDeps(cli, async (deps) => {
    const [r] = await deps.db.select().from(auditRecords).where(eq(auditRecords.id, ids[0]!));
    if (!r) throw new ApiError('not_found', `no such audit record: ${ids[0]}`);
    return r;
  });
  const v = auditView(row, true);
  output(cli, v, () => [
    `${v.id}  ${v.action} ${v.scope}  ${v.status}  ${v.outcome}${v.errorCode ? `  error ${v.errorCode}` : ''}`,
    `  workspace   ${row.workspaceId}   request ${v.requestId}`,
    `  subject     ${v.subjectKind} digest ${v.subjectDigest}`,
    `  actor       ${v.actor.type}${v.actor.id ? ` ${v.actor.id}` : ''}${v.upstreamRef ? `   upstream ref ${v.upstreamRef}` : ''}`,
    `  counts      ${JSON.stringify(v.counts)}`,
    `  started     ${v.startedAt}   finished ${v.finishedAt}   recorded ${v.recordedAt}`,
    v.chain.position === null
      ? '  chain       none (written before the chain existed)'
      : `  chain       #${v.chain.position}  ${v.chain.algorithm} ${v.chain.hash}  ${v.chain.intact ? 'intact' : 'NOT INTACT'}`,
    ...(v.chain.position === null ? [] : [`  prev hash   ${v.chain.prevHash ?? '(first record)'}`, `  canonical   ${v.chain.canonical}`]),
  ]);
  return 0;
};

function verdict(w: WorkspaceChainReport): string {
  const legacy = w.legacyRecords ? ` (+${w.legacyRecords} written before the chain)` : '';
  if (w.ok) {
    const head = w.head ? `, head #${w.head.position} ${w.head.recordId} ${w.head.hash.slice(0, 16)}…` : '';
    return `${w.workspaceId}: ok ${w.records} records${head}${legacy}`;
  }
  const b = w.firstBreak!;
  const where = b.position === null ? '' : ` at position ${b.position}`;
  return `${w.workspaceId}: BROKEN${where} (${b.recordId ?? 'no record'}): ${b.problem} — ${b.detail}`;
}

const verify: Command = async (cli, args) => {
  const { values } = parse('audit verify', args, { workspace: { type: 'string' } });
  const result = await withDeps(cli, async (deps) =>
    verifyChains(deps.db, values.workspace === undefined ? undefined : await requireWorkspace(deps.db, values.workspace)),
  );
  output(cli, result, () => (result.workspaces.length ? result.workspaces.map(verdict) : 'no workspaces'));
  return result.ok ? 0 : 1;
};

export const auditCommands: Record<string, Command> = { show, verify };
