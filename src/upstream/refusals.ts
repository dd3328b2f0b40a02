import { createHmac } from 'node:crypto';
import { sql } from 'drizzle-orm';
import type { AnyConnector } from '../../connectors/index.ts';
import type { ConnectorInstance, Refusal } from '../../connectors/types.ts';
import { upstreamRefusals } from '../db/schema/index.ts';
import { isUnstorableValue, UNSTORABLE_VALUE_MESSAGE } from '../db/errors.ts';
import { ApiError } from '../lib/errors.ts';
import type { UpstreamDeps } from './context.ts';
import { adapterContext, connectorIsCurrent, StaleConnectorError } from './store.ts';

/** Longest job key kept as it is; a longer one is kept as a keyed digest. */
const JOB_KEY_MAX = 500;

/**
 * The key a refused job is remembered under: the one given (no personal data: a vendor request id with a keyed digest
 * of the subject, or a digest of a nonce), or a keyed digest of it when it could not be stored as it is (too long, or
 * holding a control character, such as the NUL that got the job refused).
 */
export function refusalMemoryKey(deps: Pick<UpstreamDeps, 'digestKey'>, connectorId: string, key: string): string {
  if (key.length <= JOB_KEY_MAX && ![...key].some((ch) => ch < ' ' || ch === '\u007f')) return key;
  return `sha256:${createHmac('sha256', deps.digestKey).update(`${connectorId}\u0000${key}`).digest('hex')}`;
}

/**
 * Why a polled ticket is refused, as its vendor may be told: what a webhook sender would get as a 400/409 (the core's
 * messages name the problem, never a value), or undefined for an error that is not the ticket's fault.
 */
export function refusalOf(err: unknown): Refusal | undefined {
  if (err instanceof ApiError) return { code: err.code, message: err.message };
  if (isUnstorableValue(err)) return { code: 'validation_failed', message: `a value of the job ${UNSTORABLE_VALUE_MESSAGE}` };
  return undefined;
}

/** What became of a refusal: told now, told before, to be tried on a later poll, refused by the vendor, or untellable. */
export type RefusalReport = 'reported' | 'already_reported' | 'retry_later' | 'report_refused' | 'not_reportable';

/**
 * Tells the vendor that a listed job is refused, and why, once: a job already told (or whose report the vendor
 * refused outright) is not told again; one whose report failed for now (network, 429, 5xx) is tried again when
 * a later poll lists it. Throws StaleConnectorError when the connector changed since the poll read it: nothing is
 * sent with settings the admin has since changed.
 */
export async function reportRefusal(
  deps: UpstreamDeps,
  connector: { id: string; version: string },
  opened: { adapter: AnyConnector; instance: ConnectorInstance },
  job: { key: string; secret: string | undefined },
  refusal: Refusal,
): Promise<RefusalReport> {
  const { adapter, instance } = opened;
  if (!adapter.reportRefused || !job.secret) return 'not_reportable';
  const jobKey = refusalMemoryKey(deps, connector.id, job.key);
  const r = upstreamRefusals;
  const [row] = await deps.db.execute<{ current: boolean; status: string | null }>(sql`
    select ${connectorIsCurrent(connector)} as current, k.status
    from (select 1) one
    left join ${r} k on k.connector_id = ${connector.id} and k.job_key = ${jobKey}`);
  if (!row?.current) throw new StaleConnectorError();
  if (row.status === 'reported') return 'already_reported';
  if (row.status === 'failed') return 'report_refused';

  const result = await adapter.reportRefused(job.secret, refusal, instance, adapterContext(deps));
  const status = result.kind === 'delivered' ? 'reported' : result.kind === 'retry' ? 'pending' : 'failed';
  const values = {
    code: refusal.code,
    status,
    lastError: result.kind === 'delivered' ? null : result.error,
    reportedAt: result.kind === 'delivered' ? sql`now()` : null,
    updatedAt: sql`now()`,
  } as const;
  await deps.db
    .insert(r)
    .values({ connectorId: connector.id, jobKey, attempts: 1, ...values })
    .onConflictDoUpdate({ target: [r.connectorId, r.jobKey], set: { ...values, attempts: sql`${r.attempts} + 1` } });
  return status === 'reported' ? 'reported' : status === 'pending' ? 'retry_later' : 'report_refused';
}
