import { createWorkspace } from '../accounts/workspaces.ts';
import { output, parse, UsageError, withDeps, type Command } from './shared.ts';

const create: Command = async (cli, args) => {
  const { values } = parse('workspaces create', args, { name: { type: 'string' } });
  if (!values.name?.trim()) throw new UsageError('workspaces create needs --name <name>');
  const created = await withDeps(cli, (deps) => createWorkspace(deps.db, { name: values.name! }));
  output(cli, created, () => [
    `Workspace ${created.workspaceId} created. Keys are shown once; store them now.`,
    `  ingest key   ${created.ingestKey}`,
    `  privacy key  ${created.privacyKey}`,
    `  admin key    ${created.adminKey}`,
  ]);
  return 0;
};

export const workspaceCommands: Record<string, Command> = { create };
