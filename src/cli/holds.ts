import { holdView, type HoldViewBody } from '../http/privacy.ts';
import { listHolds } from '../privacy/holds.ts';
import { output, parse, required, requireWorkspace, UsageError, withDeps, type Command } from './shared.ts';

const MAX_LIMIT = 100;

const line = (h: HoldViewBody) =>
  `${h.requestId}  ${h.subjectKind.padEnd(7)}  placed ${h.placedAt}  by ${h.actor.type}${h.actor.id ? ` ${h.actor.id}` : ''} (${h.source})` +
  (h.externalRequestId ? `  external id ${h.externalRequestId}` : '') +
  h.upstream.map((t) => `  ticket ${t.ticketId} (connector ${t.connectorId}, upstream ${t.upstreamRef})`).join('');

const list: Command = async (cli, args) => {
  const { values } = parse('holds list', args, { workspace: { type: 'string' }, limit: { type: 'string' } });
  const workspaceId = required('holds list', 'workspace', values.workspace, 'id');
  const limit = values.limit === undefined ? 50 : Number(values.limit);
  if (!Number.isInteger(limit) || limit < 1 || limit > MAX_LIMIT) {
    throw new UsageError(`--limit must be an integer from 1 to ${MAX_LIMIT}`);
  }
  await withDeps(cli, async (deps) => {
    const ws = await requireWorkspace(deps.db, workspaceId);
    const data = (await listHolds(deps.db, deps.digestKey, ws, { limit })).map(holdView);
    output(cli, { data }, () => (data.length ? data.map(line) : 'no holds in force'));
  });
  return 0;
};

export const holdCommands: Record<string, Command> = { list };
