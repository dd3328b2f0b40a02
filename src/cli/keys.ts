import { eq } from 'drizzle-orm';
import { createApiKey, keyView, listApiKeys, regenerateApiKey, revokeApiKey, type ApiKeyRow } from '../accounts/keys.ts';
import type { Db } from '../db/client.ts';
import { API_KEY_SCOPES, apiKeys } from '../db/schema/index.ts';
import { ApiError } from '../lib/errors.ts';
import { resealAll, resealComplete } from '../upstream/rotate.ts';
import { iso, oneOf, output, parse, required, requireWorkspace, withDeps, type Command } from './shared.ts';

/** The workspace a key belongs to: the key verbs are scoped by workspace, the operator only knows the key id. */
async function keyWorkspace(db: Db, keyId: string): Promise<string> {
  const [row] = await db.select({ workspaceId: apiKeys.workspaceId }).from(apiKeys).where(eq(apiKeys.id, keyId));
  if (!row) throw new ApiError('not_found', `no such API key: ${keyId}`);
  return row.workspaceId;
}

const keyLine = (k: ApiKeyRow) =>
  `${k.id}  ${k.scope.padEnd(7)}  ${k.keyPrefix}…  created ${iso(k.createdAt)}  last used ${iso(k.lastUsedAt)}` +
  (k.revokedAt ? `  REVOKED ${iso(k.revokedAt)}` : '');

const list: Command = async (cli, args) => {
  const { values } = parse('keys list', args, { workspace: { type: 'string' } });
  const workspaceId = required('keys list', 'workspace', values.workspace, 'id');
  const rows = await withDeps(cli, async (deps) => listApiKeys(deps.db, await requireWorkspace(deps.db, workspaceId)));
  output(cli, { data: rows.map(keyView) }, () => (rows.length ? rows.map(keyLine) : 'no API keys'));
  return 0;
};

const create: Command = async (cli, args) => {
  const { values } = parse('keys create', args, { workspace: { type: 'string' }, scope: { type: 'string' } });
  const workspaceId = required('keys create', 'workspace', values.workspace, 'id');
  const scope = oneOf('scope', required('keys create', 'scope', values.scope, API_KEY_SCOPES.join('|')), API_KEY_SCOPES);
  const created = await withDeps(cli, async (deps) => createApiKey(deps.db, await requireWorkspace(deps.db, workspaceId), scope));
  output(cli, { ...keyView(created.row), key: created.key }, () => [
    `API key ${created.id} (${scope}) created. It is shown once; store it now:`,
    `  ${created.key}`,
  ]);
  return 0;
};

const revoke: Command = async (cli, args) => {
  const { ids } = parse('keys revoke', args, {}, ['keyId']);
  const row = await withDeps(cli, async (deps) => revokeApiKey(deps.db, await keyWorkspace(deps.db, ids[0]!), ids[0]!));
  output(cli, keyView(row), () => `API key ${row.id} (${row.scope}) revoked; it fails from now on.`);
  return 0;
};

const rotate: Command = async (cli, args) => {
  const { ids } = parse('keys rotate', args, {}, ['keyId']);
  const created = await withDeps(cli, async (deps) =>
    regenerateApiKey(deps.db, await keyWorkspace(deps.db, ids[0]!), ids[0]!),
  );
  output(cli, { ...keyView(created.row), key: created.key, revokedKeyId: created.revokedKeyId }, () => [
    `API key ${created.revokedKeyId} revoked; its replacement ${created.id} (${created.row.scope}) is shown once:`,
    `  ${created.key}`,
  ]);
  return 0;
};

const rotateMaster: Command = async (cli, args) => {
  parse('keys rotate-master', args, {});
  const report = await withDeps(cli, (deps) => resealAll(deps.db, deps.sealer));
  const kinds = [
    ['connector secrets', report.connectorSecrets],
    ['previous inbound secrets', report.previousInboundSecrets],
    ['ticket secrets', report.ticketSecrets],
    ['failed request identifiers', report.failedRequestSubjects],
  ] as const;
  if (!resealComplete(report)) {
    // Nothing was lost: every value still opens with the keys configured now. Keep the old key until a run succeeds.
    const details = kinds.flatMap(([name, c]) => {
      if (c.remaining === 0) return [];
      const others = c.remaining - c.unreadable.length;
      return [
        ...(c.unreadable.length > 0
          ? [{ path: name, message: `no configured key opens rows ${c.unreadable.join(', ')}: re-enter or clear them` }]
          : []),
        ...(others > 0
          ? [{ path: name, message: `${others} rewritten under an older key during the run by a process not yet sealing with the new key` }]
          : []),
      ];
    });
    throw new ApiError(
      'conflict',
      `not everything is sealed under master key ${report.keyId} yet (${kinds.map(([n, c]) => `${n}: ${c.resealed} re-sealed, ${c.remaining} left`).join('; ')}); keep the old key and run again`,
      details,
    );
  }
  output(cli, report, () => [
    `Everything is now sealed under master key ${report.keyId}:`,
    ...kinds.map(([name, c]) => `  ${name.padEnd(27)} ${c.resealed} re-sealed, ${c.current} already current`),
  ]);
  return 0;
};

export const keyCommands: Record<string, Command> = {
  list,
  create,
  revoke,
  rotate,
  'rotate-master': rotateMaster,
};
