import { and, asc, eq, getTableColumns, isNotNull, isNull, sql, type SQL } from 'drizzle-orm';
import { z } from 'zod';
import { connectorFor, type AnyConnector } from '../../connectors/index.ts';
import type { AdapterContext, ConnectorInstance, TestResult } from '../../connectors/types.ts';
import type { Db, DbOrTx } from '../db/client.ts';
import { connectors, upstreamTickets, VENDORS, type Vendor } from '../db/schema/index.ts';
import { ApiError, issuesToDetails } from '../lib/errors.ts';
import { newId } from '../lib/ids.ts';
import { SealError, secretFingerprint, type Sealer } from '../lib/sealing.ts';
import type { UpstreamDeps } from './context.ts';

export type ConnectorRow = typeof connectors.$inferSelect;

export const connectorCreateSchema = z.strictObject({
  vendor: z.enum(VENDORS),
  name: z.string().trim().min(1).max(200),
  config: z.record(z.string(), z.unknown()).default({}),
  secrets: z.record(z.string(), z.unknown()),
});

export const connectorUpdateSchema = z
  .strictObject({
    name: z.string().trim().min(1).max(200).optional(),
    config: z.record(z.string(), z.unknown()).optional(),
    enabled: z.boolean().optional(),
  })
  .refine((v) => Object.keys(v).length > 0, 'give at least one of name, config, enabled');

export const secretsContext = (connectorId: string) => `connector:${connectorId}:secrets`;

function adapterOf(vendor: string): AnyConnector {
  const adapter = connectorFor(vendor);
  if (!adapter) throw new Error(`no adapter for vendor ${vendor}`);
  return adapter;
}

/** Validates with the vendor's schema; failures name the field under `config.` or `secrets.`, never a value. */
function validate<T>(schema: z.ZodType<T>, value: unknown, field?: 'config' | 'secrets'): T {
  const result = schema.safeParse(value);
  if (!result.success) {
    const message = field ? `${field} is not valid for this vendor` : 'request failed validation';
    throw new ApiError('validation_failed', message, issuesToDetails(result.error.issues, field ? [field] : []));
  }
  return result.data;
}

/** Refuses a config and secrets that do not go together (the adapter's settingsProblems), naming the fields. */
function checkSettings(adapter: AnyConnector, config: unknown, secrets: unknown): void {
  const problems = adapter.settingsProblems?.(config, secrets) ?? [];
  if (problems.length > 0) {
    throw new ApiError('validation_failed', 'config and secrets do not go together for this vendor', problems);
  }
}

/** The stored secrets, or undefined when no configured key opens them (then only new secrets can help). */
function storedSecrets(sealer: Sealer, adapter: AnyConnector, row: ConnectorRow): unknown {
  if (!row.secretsSealed) return undefined;
  let plain: string;
  try {
    plain = sealer.open(row.secretsSealed, secretsContext(row.id));
  } catch (err) {
    if (err instanceof SealError) return undefined;
    throw err;
  }
  const parsed = adapter.secretsSchema.safeParse(JSON.parse(plain));
  return parsed.success ? parsed.data : undefined;
}

function sealSecrets(deps: Pick<UpstreamDeps, 'sealer' | 'digestKey'>, connectorId: string, secrets: Record<string, unknown>) {
  const fingerprints: Record<string, string> = {};
  for (const [name, value] of Object.entries(secrets)) {
    if (typeof value === 'string') fingerprints[name] = secretFingerprint(deps.digestKey, value);
  }
  return { secretsSealed: deps.sealer.seal(JSON.stringify(secrets), secretsContext(connectorId)), secretFingerprints: fingerprints };
}

export async function createConnector(deps: UpstreamDeps, workspaceId: string, input: unknown): Promise<ConnectorRow> {
  const v = validate(connectorCreateSchema, input);
  const adapter = adapterOf(v.vendor);
  const config = validate(adapter.configSchema, v.config, 'config');
  const secrets = validate(adapter.secretsSchema, v.secrets, 'secrets') as Record<string, unknown>;
  checkSettings(adapter, config, secrets);
  const id = newId('con');
  const [row] = await deps.db
    .insert(connectors)
    .values({ id, workspaceId, vendor: v.vendor, name: v.name, config, ...sealSecrets(deps, id, secrets) })
    .returning();
  deps.logger.info({ connectorId: id, vendor: v.vendor }, 'connector created');
  return row!;
}

export function listConnectors(db: Db, workspaceId: string): Promise<ConnectorRow[]> {
  return db
    .select()
    .from(connectors)
    .where(and(eq(connectors.workspaceId, workspaceId), isNull(connectors.deletedAt)))
    .orderBy(asc(connectors.id));
}

/** A connector of this workspace that is not deleted; 404 otherwise (another workspace's id looks unknown). */
export async function getConnector(db: Db, workspaceId: string, id: string): Promise<ConnectorRow> {
  const [row] = await db
    .select()
    .from(connectors)
    .where(and(eq(connectors.id, id), eq(connectors.workspaceId, workspaceId), isNull(connectors.deletedAt)));
  if (!row) throw new ApiError('not_found', 'no such connector in this workspace');
  return row;
}

/** getConnector, holding the row until the transaction ends (config and secrets are checked against each other). */
async function lockedConnector(tx: DbOrTx, workspaceId: string, id: string): Promise<ConnectorRow> {
  const [row] = await tx
    .select()
    .from(connectors)
    .where(and(eq(connectors.id, id), eq(connectors.workspaceId, workspaceId), isNull(connectors.deletedAt)))
    .for('update');
  if (!row) throw new ApiError('not_found', 'no such connector in this workspace');
  return row;
}

export async function updateConnector(deps: UpstreamDeps, workspaceId: string, id: string, input: unknown) {
  const v = validate(connectorUpdateSchema, input);
  return deps.db.transaction(async (tx) => {
    const current = await lockedConnector(tx, workspaceId, id);
    const adapter = adapterOf(current.vendor);
    const config = v.config === undefined ? undefined : validate(adapter.configSchema, v.config, 'config');
    if (config !== undefined) {
      const secrets = storedSecrets(deps.sealer, adapter, current);
      if (secrets !== undefined) checkSettings(adapter, config, secrets);
    }
    const [row] = await tx
      .update(connectors)
      .set({ name: v.name, config: config as Record<string, unknown> | undefined, enabled: v.enabled, updatedAt: sql`now()` })
      .where(eq(connectors.id, id))
      .returning();
    return row!;
  });
}

/** Replaces the whole secret set (validated as a set, so a vendor's required secrets cannot be dropped). */
export async function replaceSecrets(deps: UpstreamDeps, workspaceId: string, id: string, input: unknown) {
  const body = validate(z.strictObject({ secrets: z.record(z.string(), z.unknown()) }), input);
  const row = await deps.db.transaction(async (tx) => {
    const current = await lockedConnector(tx, workspaceId, id);
    const adapter = adapterOf(current.vendor);
    const secrets = validate(adapter.secretsSchema, body.secrets, 'secrets') as Record<string, unknown>;
    const config = adapter.configSchema.safeParse(current.config);
    if (config.success) checkSettings(adapter, config.data, secrets);
    const [updated] = await tx
      .update(connectors)
      .set({ ...sealSecrets(deps, id, secrets), secretsRotatedAt: sql`now()`, updatedAt: sql`now()` })
      .where(eq(connectors.id, id))
      .returning();
    return updated!;
  });
  deps.logger.info({ connectorId: id }, 'connector secrets replaced');
  return row;
}

/**
 * Soft delete: the row stays (requests and audit records name it) but its secrets are wiped and it answers 404
 * everywhere. Tickets still waiting to be reported fail with `connector_deleted`.
 */
export async function deleteConnector(deps: UpstreamDeps, workspaceId: string, id: string): Promise<void> {
  await deps.db.transaction(async (tx) => {
    const rows = await tx
      .update(connectors)
      .set({ deletedAt: sql`now()`, enabled: false, secretsSealed: null, secretFingerprints: {}, updatedAt: sql`now()` })
      .where(and(eq(connectors.id, id), eq(connectors.workspaceId, workspaceId), isNull(connectors.deletedAt)))
      .returning({ id: connectors.id });
    if (rows.length === 0) throw new ApiError('not_found', 'no such connector in this workspace');
    // Its tickets' capabilities (Transcend nonces) go with it: nothing can report through a deleted connector, and a
    // bearer capability kept for nothing is only a liability.
    await tx
      .update(upstreamTickets)
      .set({ secretSealed: null, updatedAt: sql`now()` })
      .where(and(eq(upstreamTickets.connectorId, id), isNotNull(upstreamTickets.secretSealed)));
  });
  deps.logger.info({ connectorId: id }, 'connector deleted');
}

/**
 * A connector row's version: its xmin, which every UPDATE of the row changes (whoever makes it), and which freezing
 * keeps. What a webhook was verified with is current exactly when the row still has this version.
 */
export const rowVersion = sql<string>`${connectors}.xmin::text`;

/** The connector a webhook URL names, if it exists, is enabled and belongs to that vendor; with its row version. */
export async function findWebhookConnector(
  db: Db,
  vendor: string,
  id: string,
): Promise<(ConnectorRow & { version: string }) | undefined> {
  if (!(VENDORS as readonly string[]).includes(vendor) || !/^con_[0-9a-z]{25}$/.test(id)) return undefined;
  const [row] = await db
    .select({ ...getTableColumns(connectors), version: rowVersion })
    .from(connectors)
    .where(
      and(
        eq(connectors.id, id),
        eq(connectors.vendor, vendor as Vendor),
        eq(connectors.enabled, true),
        isNull(connectors.deletedAt),
      ),
    );
  return row;
}

/** The connector as a webhook found it: still this version, enabled and not deleted (SQL true/false). */
export function connectorIsCurrent(c: { id: string; version: string }): SQL {
  return sql`exists (select 1 from ${connectors} where ${connectors.id} = ${c.id} and ${rowVersion} = ${c.version}
                       and ${connectors.enabled} and ${connectors.deletedAt} is null)`;
}

/** The connector changed (secrets, config, disabled, deleted) after a webhook was verified with it. */
export class StaleConnectorError extends Error {
  constructor() {
    super('connector changed while the webhook was handled');
  }
}

export interface WebhookConnector {
  row: ConnectorRow;
  version: string;
  adapter: AnyConnector;
  instance: ConnectorInstance;
}

/**
 * The web process's opened connectors (secrets unsealed, config parsed), so a webhook costs no look-up: each is
 * used as it was at `version`, and whatever stores a webhook's ticket checks in the same statement that the row is
 * still at that version (connectorIsCurrent), throwing StaleConnectorError if not; the caller then loads it again.
 * Only connectors that exist are kept, so the map is as large as the connectors table at most.
 */
export class WebhookConnectors {
  private readonly opened = new Map<string, WebhookConnector>();

  constructor(private readonly deps: { db: Db; sealer: Sealer }) {}

  cached(vendor: string, id: string): WebhookConnector | undefined {
    const entry = this.opened.get(id);
    return entry?.row.vendor === vendor ? entry : undefined;
  }

  /** Reads the row again; unknown, disabled, deleted or another vendor's → undefined (and forgotten). */
  async load(vendor: string, id: string): Promise<WebhookConnector | undefined> {
    const found = await findWebhookConnector(this.deps.db, vendor, id);
    if (!found) {
      this.opened.delete(id);
      return undefined;
    }
    const { version, ...row } = found;
    const known = this.opened.get(id);
    if (known?.version === version && known.row.vendor === row.vendor) return known;
    const entry = { row, version, ...openConnector(this.deps.sealer, row) };
    this.opened.set(id, entry);
    return entry;
  }
}

/** Opens a stored connector for its adapter: config re-validated (fills newer defaults), secrets unsealed. */
export function openConnector(
  sealer: Sealer,
  row: Pick<ConnectorRow, 'id' | 'workspaceId' | 'vendor' | 'config' | 'secretsSealed'>,
): { adapter: AnyConnector; instance: ConnectorInstance } {
  const adapter = adapterOf(row.vendor);
  if (!row.secretsSealed) throw new Error('connector has no secrets (deleted)');
  const secrets = JSON.parse(sealer.open(row.secretsSealed, secretsContext(row.id))) as unknown;
  return {
    adapter,
    instance: {
      id: row.id,
      workspaceId: row.workspaceId,
      config: adapter.configSchema.parse(row.config),
      secrets: adapter.secretsSchema.parse(secrets),
    },
  };
}

type Opened = ReturnType<typeof openConnector>;
const keptOpen = new WeakMap<Sealer, Map<string, { version: string; opened: Opened }>>();

/**
 * openConnector for a row read with its version (rowVersion), kept until the row changes: unsealing the secrets and
 * validating the config took a fair share of a report's CPU, once per report. Bounded by the number of connectors.
 */
export function openConnectorAt(
  sealer: Sealer,
  row: Parameters<typeof openConnector>[1] & { version: string },
): Opened {
  let kept = keptOpen.get(sealer);
  if (!kept) keptOpen.set(sealer, (kept = new Map()));
  const known = kept.get(row.id);
  if (known?.version === row.version) return known.opened;
  const opened = openConnector(sealer, row);
  kept.set(row.id, { version: row.version, opened });
  return opened;
}

/**
 * Checks a connector's credentials against its vendor. Secrets no configured master key opens (a key removed before
 * `keys rotate-master` re-sealed them) are a failed check telling the admin to re-enter them, not an error.
 */
export async function testConnector(deps: UpstreamDeps, row: ConnectorRow): Promise<TestResult> {
  let opened: ReturnType<typeof openConnector>;
  try {
    opened = openConnector(deps.sealer, row);
  } catch (err) {
    if (!(err instanceof SealError)) throw err;
    const detail = 'the stored secrets do not open with the configured master keys: replace them (PUT .../secrets)';
    return { ok: false, checks: [{ name: 'secrets', ok: false, detail }] };
  }
  return opened.adapter.test(opened.instance, adapterContext(deps));
}

export function adapterContext(deps: UpstreamDeps): AdapterContext {
  return { http: deps.http, cache: deps.cache, logger: deps.logger, now: () => new Date() };
}
