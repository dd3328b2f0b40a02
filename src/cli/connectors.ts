import { eq } from 'drizzle-orm';
import type { Db } from '../db/client.ts';
import { connectors, VENDORS } from '../db/schema/index.ts';
import { connectorView, type PollStatus } from '../http/admin.ts';
import type { AppDeps } from '../http/env.ts';
import { ApiError } from '../lib/errors.ts';
import {
  createConnector,
  endPreviousSecrets,
  getConnector,
  listConnectors,
  replaceSecrets,
  testConnector,
  updateConnector,
  type ConnectorWithStatus,
} from '../upstream/store.ts';
import {
  iso,
  oneOf,
  output,
  parse,
  parseJsonObject,
  readJsonObject,
  refuseOnCommandLine,
  required,
  requireWorkspace,
  UsageError,
  withDeps,
  type Cli,
  type Command,
} from './shared.ts';

const SECRETS_HINT = 'secrets are never taken on the command line; use --secrets-file <file> or --secrets-stdin';

/** The workspace a connector belongs to: the store's verbs are scoped by workspace, the operator only has the id. */
async function connectorWorkspace(db: Db, id: string): Promise<string> {
  const [row] = await db.select({ workspaceId: connectors.workspaceId }).from(connectors).where(eq(connectors.id, id));
  if (!row) throw new ApiError('not_found', `no such connector: ${id}`);
  return row.workspaceId;
}

/** Secrets from exactly one of --secrets-file / --secrets-stdin. */
async function readSecrets(
  cli: Cli,
  command: string,
  values: { 'secrets-file'?: string; 'secrets-stdin'?: boolean },
): Promise<Record<string, unknown>> {
  const file = values['secrets-file'];
  const stdin = values['secrets-stdin'] === true;
  if (file !== undefined && stdin) throw new UsageError('give only one of --secrets-file and --secrets-stdin');
  if (file !== undefined) return readJsonObject({ flag: '--secrets-file', file });
  if (stdin) return readJsonObject({ flag: '--secrets-stdin', stdin: cli.stdin });
  throw new UsageError(`${command} needs --secrets-file <file> or --secrets-stdin (a JSON object)`);
}

const SECRET_OPTIONS = { 'secrets-file': { type: 'string' }, 'secrets-stdin': { type: 'boolean' } } as const;

/** How the scheduled polls of a pull connector went, in a line (failing first: that is what an admin looks for). */
function pollSummary(p: PollStatus): string {
  if (p.consecutiveFailures > 0 && p.lastFailure) {
    const f = p.lastFailure;
    return `FAILING: ${p.consecutiveFailures} in a row, last at ${f.at}: ${f.code}: ${f.message}`;
  }
  if (p.lastSucceededAt) return `ok, last succeeded ${p.lastSucceededAt}`;
  return p.lastStartedAt ? `started ${p.lastStartedAt}, not finished yet` : 'not polled yet';
}

/** The same, short, for the one-line listing. */
function pollBrief(p: PollStatus): string {
  if (p.consecutiveFailures > 0 && p.lastFailure) return `poll FAILING (${p.consecutiveFailures} in a row: ${p.lastFailure.code})`;
  return p.lastSucceededAt ? `poll ok (last ${p.lastSucceededAt})` : 'poll not yet';
}

function describe(deps: AppDeps, row: ConnectorWithStatus): string[] {
  const v = connectorView(deps, row);
  const secrets = Object.entries(v.secrets).map(([name, s]) =>
    s.previous
      ? `${name} (${s.fingerprint}; previous ${s.previous.fingerprint} still accepted until ${s.previous.expiresAt})`
      : `${name} (${s.fingerprint})`,
  );
  return [
    `${v.id}  ${v.vendor}  "${v.name}"  ${v.enabled ? 'enabled' : 'DISABLED'}`,
    `  workspace   ${row.workspaceId}`,
    `  webhook     ${v.webhookUrl ?? v.webhookPath}`,
    `  config      ${JSON.stringify(v.config)}`,
    `  secrets     ${secrets.join(', ') || 'none'}`,
    `  updated     ${v.updatedAt}, secrets rotated ${v.secretsRotatedAt}`,
    ...(v.pollStatus ? [`  poll        ${pollSummary(v.pollStatus)}`, `  next poll   ${v.pollStatus.nextPollDueAt ?? '-'}`] : []),
  ];
}

const add: Command = async (cli, args) => {
  refuseOnCommandLine(args, ['secrets', 'secret'], SECRETS_HINT);
  const { values } = parse('connectors add', args, {
    workspace: { type: 'string' },
    vendor: { type: 'string' },
    name: { type: 'string' },
    config: { type: 'string' },
    'config-file': { type: 'string' },
    ...SECRET_OPTIONS,
  });
  const workspaceId = required('connectors add', 'workspace', values.workspace, 'id');
  const vendor = oneOf('vendor', required('connectors add', 'vendor', values.vendor, VENDORS.join('|')), VENDORS);
  const name = required('connectors add', 'name', values.name);
  if (values.config !== undefined && values['config-file'] !== undefined) {
    throw new UsageError('give only one of --config and --config-file');
  }
  const config =
    values.config !== undefined
      ? parseJsonObject('--config', values.config)
      : values['config-file'] !== undefined
        ? await readJsonObject({ flag: '--config-file', file: values['config-file'] })
        : {};
  const secrets = await readSecrets(cli, 'connectors add', values);
  await withDeps(cli, async (deps) => {
    const row = await createConnector(deps, await requireWorkspace(deps.db, workspaceId), { vendor, name, config, secrets });
    output(cli, connectorView(deps, row), () => ['Connector created:', ...describe(deps, row)]);
  });
  return 0;
};

const list: Command = async (cli, args) => {
  const { values } = parse('connectors list', args, { workspace: { type: 'string' } });
  const workspaceId = required('connectors list', 'workspace', values.workspace, 'id');
  await withDeps(cli, async (deps) => {
    const rows = await listConnectors(deps.db, await requireWorkspace(deps.db, workspaceId));
    const views = rows.map((r) => connectorView(deps, r));
    output(cli, { data: views }, () =>
      views.length
        ? views.map(
            (v, i) =>
              `${v.id}  ${v.vendor.padEnd(9)}  ${v.enabled ? 'enabled ' : 'DISABLED'}  "${v.name}"  updated ${iso(rows[i]!.updatedAt)}` +
              (v.pollStatus ? `  ${pollBrief(v.pollStatus)}` : ''),
          )
        : 'no connectors',
    );
  });
  return 0;
};

/** The not-deleted connector with this id, whatever its workspace. */
async function connectorById(deps: AppDeps, id: string): Promise<ConnectorWithStatus> {
  return getConnector(deps.db, await connectorWorkspace(deps.db, id), id);
}

const show: Command = async (cli, args) => {
  const { ids } = parse('connectors show', args, {}, ['connectorId']);
  await withDeps(cli, async (deps) => {
    const row = await connectorById(deps, ids[0]!);
    output(cli, connectorView(deps, row), () => describe(deps, row));
  });
  return 0;
};

const test: Command = async (cli, args) => {
  const { ids } = parse('connectors test', args, {}, ['connectorId']);
  return withDeps(cli, async (deps) => {
    const row = await connectorById(deps, ids[0]!);
    const result = await testConnector(deps, row);
    // The checks are made now; a pull connector's scheduled polls may have been failing for a while (not a check).
    const polls = connectorView(deps, row).pollStatus;
    output(cli, result, () => [
      `${row.id} (${row.vendor}): ${result.ok ? 'ok' : 'NOT OK'}`,
      ...result.checks.map((c) => `  ${c.ok ? 'ok  ' : c.skipped ? '--  ' : 'FAIL'}  ${c.name}: ${c.detail}`),
      ...(polls ? [`  scheduled polls: ${pollSummary(polls)}`] : []),
    ]);
    return result.ok ? 0 : 1;
  });
};

/** `connectors disable` / `connectors enable`: what PATCH {enabled} does through the API. */
const setEnabled =
  (enabled: boolean): Command =>
  async (cli, args) => {
    const { ids } = parse(`connectors ${enabled ? 'enable' : 'disable'}`, args, {}, ['connectorId']);
    await withDeps(cli, async (deps) => {
      const row = await updateConnector(deps, await connectorWorkspace(deps.db, ids[0]!), ids[0]!, { enabled });
      output(cli, connectorView(deps, row), () =>
        enabled
          ? `Connector ${row.id} enabled: its webhook takes tickets again.`
          : `Connector ${row.id} disabled: its webhook answers 404 from now on.`,
      );
    });
    return 0;
  };

const rotateSecret: Command = async (cli, args) => {
  refuseOnCommandLine(args, ['secrets', 'secret'], SECRETS_HINT);
  const options = { ...SECRET_OPTIONS, 'keep-previous-for-seconds': { type: 'string' } } as const;
  const { values, ids } = parse('connectors rotate-secret', args, options, ['connectorId']);
  const keep = values['keep-previous-for-seconds'];
  if (keep !== undefined && !/^\d{1,9}$/.test(keep)) {
    throw new UsageError('--keep-previous-for-seconds must be a whole number of seconds (0 to 604800)');
  }
  const secrets = await readSecrets(cli, 'connectors rotate-secret', values);
  await withDeps(cli, async (deps) => {
    const input = keep === undefined ? { secrets } : { secrets, keepPreviousForSeconds: Number(keep) };
    const row = await replaceSecrets(deps, await connectorWorkspace(deps.db, ids[0]!), ids[0]!, input);
    output(cli, connectorView(deps, row), () => ['Secrets replaced:', ...describe(deps, row)]);
  });
  return 0;
};

const endPrevious: Command = async (cli, args) => {
  const { ids } = parse('connectors end-previous-secrets', args, {}, ['connectorId']);
  await withDeps(cli, async (deps) => {
    const row = await endPreviousSecrets(deps, await connectorWorkspace(deps.db, ids[0]!), ids[0]!);
    output(cli, connectorView(deps, row), () => [
      `Connector ${row.id}: replaced inbound secrets no longer verify webhooks.`,
      ...describe(deps, row),
    ]);
  });
  return 0;
};

export const connectorCommands: Record<string, Command> = {
  add,
  list,
  show,
  test,
  disable: setEnabled(false),
  enable: setEnabled(true),
  'rotate-secret': rotateSecret,
  'end-previous-secrets': endPrevious,
};
