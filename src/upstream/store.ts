import { and, asc, eq, getTableColumns, isNotNull, isNull, sql, type SQL } from 'drizzle-orm';
import { z } from 'zod';
import { connectorFor, type AnyConnector } from '../../connectors/index.ts';
import {
  WebhookAuthError,
  type AdapterContext,
  type ConnectorInstance,
  type RawWebhook,
  type TestResult,
  type Verified,
} from '../../connectors/types.ts';
import type { Db, DbOrTx } from '../db/client.ts';
import { connectorPollStatus, connectors, upstreamTickets, VENDORS, type Vendor } from '../db/schema/index.ts';
import { ApiError, issuesToDetails } from '../lib/errors.ts';
import { newId } from '../lib/ids.ts';
import { SealError, secretFingerprint, type Sealer } from '../lib/sealing.ts';
import type { UpstreamDeps } from './context.ts';

export type ConnectorRow = typeof connectors.$inferSelect;
export type PollStatusRow = typeof connectorPollStatus.$inferSelect;
/** A connector as admins read it: with its pull mode health (null if it was never polled). */
export type ConnectorWithStatus = ConnectorRow & { pollStatus: PollStatusRow | null };

/** What a failed `secrets` check and a failed poll say when no configured master key opens the stored secrets. */
export const SECRETS_UNREADABLE = 'the stored secrets do not open with the configured master keys: replace them (PUT .../secrets)';

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
/** Where a connector's previous inbound secrets are sealed (a grace period after they were replaced). */
export const previousSecretsContext = (connectorId: string) => `connector:${connectorId}:previous-secrets`;

/** The longest a replaced inbound secret may stay valid: seven days. */
export const MAX_KEEP_PREVIOUS_SECONDS = 7 * 86_400;

export const secretsReplaceSchema = z.strictObject({
  secrets: z.record(z.string(), z.unknown()),
  /** How long the inbound secrets this write replaces stay valid beside the new ones; 0 ends them at once. */
  keepPreviousForSeconds: z
    .number()
    .int()
    .min(0)
    .max(MAX_KEEP_PREVIOUS_SECONDS, `must be at most ${MAX_KEEP_PREVIOUS_SECONDS} (seven days)`)
    .default(0),
});

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

function fingerprintsOf(digestKey: Buffer, secrets: Record<string, unknown>): Record<string, string> {
  const fingerprints: Record<string, string> = {};
  for (const [name, value] of Object.entries(secrets)) {
    if (typeof value === 'string') fingerprints[name] = secretFingerprint(digestKey, value);
  }
  return fingerprints;
}

function sealSecrets(deps: Pick<UpstreamDeps, 'sealer' | 'digestKey'>, connectorId: string, secrets: Record<string, unknown>) {
  return {
    secretsSealed: deps.sealer.seal(JSON.stringify(secrets), secretsContext(connectorId)),
    secretFingerprints: fingerprintsOf(deps.digestKey, secrets),
  };
}

/** No previous inbound secrets: what a PUT with no window, ending the grace, a deletion or the maintenance leave. */
const NO_PREVIOUS_SECRETS = { previousSecretsSealed: null, previousSecretFingerprints: {}, previousSecretsExpireAt: null };

/**
 * The inbound secrets a write replaces, with their old values: those the adapter names as verifying webhooks whose
 * value changes. Nothing when the stored secrets do not open (then no old value is known).
 */
function replacedInboundSecrets(adapter: AnyConnector, before: unknown, after: Record<string, unknown>): Record<string, string> {
  const replaced: Record<string, string> = {};
  if (typeof before !== 'object' || before === null) return replaced;
  for (const name of adapter.inboundSecrets) {
    const old = (before as Record<string, unknown>)[name];
    if (typeof old === 'string' && old !== after[name]) replaced[name] = old;
  }
  return replaced;
}

export async function createConnector(deps: UpstreamDeps, workspaceId: string, input: unknown): Promise<ConnectorWithStatus> {
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
  return { ...row!, pollStatus: null };
}

/** Connectors with their poll status: one join on the status table's primary key. */
function withStatus(db: DbOrTx, where: SQL | undefined) {
  return db
    .select({ connector: connectors, pollStatus: connectorPollStatus })
    .from(connectors)
    .leftJoin(connectorPollStatus, eq(connectorPollStatus.connectorId, connectors.id))
    .where(where)
    .orderBy(asc(connectors.id))
    .then((rows) => rows.map((r): ConnectorWithStatus => ({ ...r.connector, pollStatus: r.pollStatus })));
}

export function listConnectors(db: Db, workspaceId: string): Promise<ConnectorWithStatus[]> {
  return withStatus(db, and(eq(connectors.workspaceId, workspaceId), isNull(connectors.deletedAt)));
}

/** A connector of this workspace that is not deleted; 404 otherwise (another workspace's id looks unknown). */
export async function getConnector(db: DbOrTx, workspaceId: string, id: string): Promise<ConnectorWithStatus> {
  const [row] = await withStatus(db, and(eq(connectors.id, id), eq(connectors.workspaceId, workspaceId), isNull(connectors.deletedAt)));
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

export async function updateConnector(deps: UpstreamDeps, workspaceId: string, id: string, input: unknown): Promise<ConnectorWithStatus> {
  const v = validate(connectorUpdateSchema, input);
  return deps.db.transaction(async (tx) => {
    const current = await lockedConnector(tx, workspaceId, id);
    const adapter = adapterOf(current.vendor);
    const config = v.config === undefined ? undefined : validate(adapter.configSchema, v.config, 'config');
    if (config !== undefined) {
      const secrets = storedSecrets(deps.sealer, adapter, current);
      if (secrets !== undefined) checkSettings(adapter, config, secrets);
    }
    await tx
      .update(connectors)
      .set({ name: v.name, config: config as Record<string, unknown> | undefined, enabled: v.enabled, updatedAt: sql`now()` })
      .where(eq(connectors.id, id));
    return getConnector(tx, workspaceId, id);
  });
}

/**
 * Replaces the whole secret set (validated as a set, so a vendor's required secrets cannot be dropped). With
 * `keepPreviousForSeconds`, the inbound secrets it changes keep verifying webhooks beside the new ones until then
 * (the vendor may still send with the old one until its admin changes it too); this replaces any earlier such set,
 * which one changing no inbound secret leaves alone, and 0 (the default) keeps none.
 */
export async function replaceSecrets(deps: UpstreamDeps, workspaceId: string, id: string, input: unknown): Promise<ConnectorWithStatus> {
  const body = validate(secretsReplaceSchema, input);
  const { row, kept } = await deps.db.transaction(async (tx) => {
    const current = await lockedConnector(tx, workspaceId, id);
    const adapter = adapterOf(current.vendor);
    const secrets = validate(adapter.secretsSchema, body.secrets, 'secrets') as Record<string, unknown>;
    const config = adapter.configSchema.safeParse(current.config);
    if (config.success) checkSettings(adapter, config.data, secrets);
    const seconds = body.keepPreviousForSeconds;
    const replaced = seconds > 0 ? replacedInboundSecrets(adapter, storedSecrets(deps.sealer, adapter, current), secrets) : {};
    // With a window asked for but no inbound secret changed (the same PUT again: a client's retry after a lost answer,
    // or a double submit), a window already running is left as it is: the vendor may still be signing with that old
    // secret, and sending the same request twice must not do more than sending it once.
    const previous =
      seconds === 0
        ? NO_PREVIOUS_SECRETS
        : Object.keys(replaced).length === 0
          ? {}
          : {
              previousSecretsSealed: deps.sealer.seal(JSON.stringify(replaced), previousSecretsContext(id)),
              previousSecretFingerprints: fingerprintsOf(deps.digestKey, replaced),
              previousSecretsExpireAt: sql`now() + make_interval(secs => ${seconds})`,
            };
    await tx
      .update(connectors)
      .set({ ...sealSecrets(deps, id, secrets), ...previous, secretsRotatedAt: sql`now()`, updatedAt: sql`now()` })
      .where(eq(connectors.id, id));
    return { row: await getConnector(tx, workspaceId, id), kept: Object.keys(replaced) };
  });
  deps.logger.info(
    { connectorId: id, keptPrevious: kept, previousUntil: row.previousSecretsExpireAt?.toISOString() },
    'connector secrets replaced',
  );
  return row;
}

/**
 * Ends the grace period of the previous inbound secrets at once (e.g. the old secret leaked); the current secrets
 * stay. Nothing to end is no error: the connector is returned as it is.
 */
export async function endPreviousSecrets(deps: UpstreamDeps, workspaceId: string, id: string): Promise<ConnectorWithStatus> {
  const { row, ended } = await deps.db.transaction(async (tx) => {
    const current = await lockedConnector(tx, workspaceId, id);
    if (current.previousSecretsSealed === null) return { row: await getConnector(tx, workspaceId, id), ended: false };
    await tx
      .update(connectors)
      .set({ ...NO_PREVIOUS_SECRETS, updatedAt: sql`now()` })
      .where(eq(connectors.id, id));
    return { row: await getConnector(tx, workspaceId, id), ended: true };
  });
  if (ended) deps.logger.info({ connectorId: id }, 'connector previous inbound secrets ended');
  return row;
}

/** Hourly: wipes previous inbound secrets whose window has ended (they verify nothing any more). */
export async function prunePreviousSecrets(db: Db): Promise<number> {
  const rows = await db
    .update(connectors)
    .set(NO_PREVIOUS_SECRETS)
    .where(sql`${connectors.previousSecretsExpireAt} <= now()`)
    .returning({ id: connectors.id });
  return rows.length;
}

/**
 * Soft delete: the row stays (requests and audit records name it) but its secrets are wiped and it answers 404
 * everywhere. Tickets still waiting to be reported fail with `connector_deleted`.
 */
export async function deleteConnector(deps: UpstreamDeps, workspaceId: string, id: string): Promise<void> {
  await deps.db.transaction(async (tx) => {
    const rows = await tx
      .update(connectors)
      .set({
        deletedAt: sql`now()`,
        enabled: false,
        secretsSealed: null,
        secretFingerprints: {},
        ...NO_PREVIOUS_SECRETS,
        updatedAt: sql`now()`,
      })
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
  /** Inbound secrets replaced with a grace period, unsealed, and the end of that period. */
  previous?: PreviousSecrets;
}

export interface PreviousSecrets {
  secrets: Record<string, string>;
  expiresAt: Date;
}

/**
 * The previous inbound secrets of a connector row, unsealed; undefined when there are none, or when no configured
 * master key opens them (a webhook signed with the old secret is then refused, as it would be without a window).
 */
function openPreviousSecrets(sealer: Sealer, adapter: AnyConnector, row: ConnectorRow): PreviousSecrets | undefined {
  if (!row.previousSecretsSealed || !row.previousSecretsExpireAt) return undefined;
  let plain: string;
  try {
    plain = sealer.open(row.previousSecretsSealed, previousSecretsContext(row.id));
  } catch (err) {
    if (err instanceof SealError) return undefined;
    throw err;
  }
  const stored = JSON.parse(plain) as Record<string, unknown>;
  const secrets: Record<string, string> = {};
  for (const name of adapter.inboundSecrets) {
    if (typeof stored[name] === 'string') secrets[name] = stored[name];
  }
  return Object.keys(secrets).length > 0 ? { secrets, expiresAt: row.previousSecretsExpireAt } : undefined;
}

/**
 * Verifies a webhook with the connector's secrets. When they refuse it and the connector has previous inbound
 * secrets still within their window — judged on the clock now, since a copy kept opened is not told the window
 * ended — it is verified again with those in place of the current ones. `previous` then names the secrets used.
 */
export async function verifyWebhook(
  conn: WebhookConnector,
  req: RawWebhook,
  ctx: AdapterContext,
): Promise<{ verified: Verified; instance: ConnectorInstance; previous?: string[] }> {
  try {
    return { verified: await conn.adapter.verify(req, conn.instance, ctx), instance: conn.instance };
  } catch (err) {
    const previous = conn.previous;
    if (!(err instanceof WebhookAuthError) || !previous || previous.expiresAt.getTime() <= ctx.now().getTime()) throw err;
    const instance = { ...conn.instance, secrets: { ...(conn.instance.secrets as object), ...previous.secrets } };
    try {
      return { verified: await conn.adapter.verify(req, instance, ctx), instance, previous: Object.keys(previous.secrets) };
    } catch (again) {
      // Refused with the old secret too: the answer is the current secret's.
      throw again instanceof WebhookAuthError ? err : again;
    }
  }
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
    const opened = openConnector(this.deps.sealer, row);
    const entry = { row, version, ...opened, previous: openPreviousSecrets(this.deps.sealer, opened.adapter, row) };
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
    return { ok: false, checks: [{ name: 'secrets', ok: false, detail: SECRETS_UNREADABLE }] };
  }
  return opened.adapter.test(opened.instance, adapterContext(deps));
}

export function adapterContext(deps: UpstreamDeps): AdapterContext {
  return { http: deps.http, cache: deps.cache, logger: deps.logger, now: () => new Date() };
}
