import { createHmac } from 'node:crypto';
import { sql, type SQL } from 'drizzle-orm';
import type { AnyConnector } from '../../connectors/index.ts';
import type { ConnectorInstance, Refusal } from '../../connectors/types.ts';
import { connectors, upstreamRefusals } from '../db/schema/index.ts';
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
  // Seen by the connector's poll under way: it is not yet counted in complete_polls.
  const lastSeenPoll = sql`(select ${connectors.completePolls} from ${connectors} where ${connectors.id} = ${connector.id})`;
  await deps.db
    .insert(r)
    .values({ connectorId: connector.id, jobKey, attempts: 1, lastSeenPoll, ...values })
    .onConflictDoUpdate({ target: [r.connectorId, r.jobKey], set: { ...values, attempts: sql`${r.attempts} + 1` } });
  return status === 'reported' ? 'reported' : status === 'pending' ? 'retry_later' : 'report_refused';
}

// A poll that succeeds marks the refused jobs it listed as seen, at its count of whole polls (recordPollSuccess in
// poll.ts, with the connector's other bookkeeping).
/** A refusal is forgotten once no poll listed its job for this long… */
export const REFUSAL_FORGET_DAYS = 30;
/** …and the connector has read its whole pending list this many times since the read that found it. */
export const REFUSAL_FORGET_POLLS = 3;

/**
 * One batch of the prune of refusals whose job Transcend no longer lists (solved or withdrawn upstream, or corrected
 * and taken as a new job): not seen for REFUSAL_FORGET_DAYS, and missing from the REFUSAL_FORGET_POLLS whole reads of
 * the list after the one that found it (a read of a long list spans several polls: PollResult.complete ends one, and
 * last_seen_poll is the number of the read a poll was part of), so a connector that stopped polling (disabled, out of
 * pull mode, failing) forgets nothing it
 * may be told again. A deleted connector never polls again: its refusals go after REFUSAL_FORGET_DAYS. Forgetting
 * a job that is listed again means telling Transcend once more. The plan is checked in query-plans.test.ts.
 */
export function forgottenRefusalsPrune(limit: number): SQL {
  return sql`
    with doomed as (
      select r.connector_id, r.job_key
        from ${upstreamRefusals} r join ${connectors} c on c.id = r.connector_id
       where r.last_seen_at < now() - make_interval(days => ${REFUSAL_FORGET_DAYS}::int)
         and (c.deleted_at is not null or c.complete_polls - r.last_seen_poll >= ${REFUSAL_FORGET_POLLS}::int)
       order by r.last_seen_at
       limit ${limit}::int
       for update of r skip locked)
    delete from ${upstreamRefusals} r using doomed
     where r.connector_id = doomed.connector_id and r.job_key = doomed.job_key
    returning 1`;
}
