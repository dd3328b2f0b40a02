import { and, eq, getTableColumns, isNull, sql } from 'drizzle-orm';
import { connectorFor } from '../../connectors/index.ts';
import { CheckFailed } from '../../connectors/shared.ts';
import { connectorPollStatus, connectors, upstreamRefusals } from '../db/schema/index.ts';
import type { JsonValue, Refusal } from '../../connectors/types.ts';
import { isUnstorableValue, pgCode, safeErrorCode } from '../db/errors.ts';
import { OutboundError } from '../lib/outbound.ts';
import { SealError } from '../lib/sealing.ts';
import type { UpstreamDeps } from './context.ts';
import {
  adapterContext,
  connectorIsCurrent,
  openConnector,
  rowVersion,
  SECRETS_UNREADABLE,
  StaleConnectorError,
  type ConnectorRow,
} from './store.ts';
import { refusalMemoryKey, refusalOf, reportRefusal, type RefusalReport } from './refusals.ts';
import { pruneExpiredTokens, receiveTickets, requeueStalledReports, storedTicketKey } from './tickets.ts';

/** A pending report this long past due has lost its job; the tick adds it again. */
const STALLED_REPORT_MINUTES = 15;

/** How often a connector is polled, in minutes; null when it is not in pull mode (or its vendor has none). */
export function pollIntervalOf(row: Pick<ConnectorRow, 'vendor' | 'config'>): number | null {
  const adapter = connectorFor(row.vendor);
  if (!adapter?.poll || !adapter.pollIntervalMinutes) return null;
  const parsed = adapter.configSchema.safeParse(row.config);
  return parsed.success ? adapter.pollIntervalMinutes(parsed.data) : null;
}

/**
 * The cron fan-out (every minute): one poll_connector job per connector in pull mode whose interval has passed since
 * its last poll was scheduled or finished, and whose last poll job is over,
 * requeueing of reports whose jobs were lost, and pruning of expired webhook token ids.
 */
export async function connectorsTick(
  deps: UpstreamDeps,
  now = new Date(),
): Promise<{ scheduled: string[]; requeued: number }> {
  await pruneExpiredTokens(deps.db, now);
  const requeued = await requeueStalledReports(deps.db, STALLED_REPORT_MINUTES);
  if (requeued > 0) {
    deps.outbox.kick();
    deps.logger.warn({ requeued }, 'requeued reports whose jobs were lost');
  }
  const rows = await deps.db
    .select({
      id: connectors.id,
      vendor: connectors.vendor,
      config: connectors.config,
      lastPolledAt: connectors.lastPolledAt,
      version: rowVersion,
    })
    .from(connectors)
    .where(and(eq(connectors.enabled, true), isNull(connectors.deletedAt)));
  const due: { id: string; version: string }[] = [];
  for (const row of rows) {
    const minutes = pollIntervalOf(row);
    if (minutes === null) continue;
    if (row.lastPolledAt && row.lastPolledAt.getTime() + minutes * 60_000 > now.getTime() + 1_000) continue;
    due.push({ id: row.id, version: row.version });
  }
  if (due.length === 0) return { scheduled: [], requeued };
  // A poll is claimed when it is scheduled: the interval runs from there, so a poll that fails is tried again by its
  // own job (a few attempts) and then waits for its interval, not polled afresh every minute. A connector whose poll
  // job is still running or waiting for a retry gets none beside it (re-adding its key would start a second poll
  // next to a running one, or give a failing one a fresh attempt budget). Only a row still as this tick read it is
  // claimed: that check is made again on the row as another tick running at the same time (a failed tick retried
  // as the next one runs) left it, whereas the look at the jobs still sees them as of this statement's start, when
  // the other tick's poll job, queued meanwhile and perhaps already running, was not there yet.
  const scheduled = await deps.db.execute<{ id: string }>(sql`
    with claimed as (
      update ${connectors} c set last_polled_at = ${now.toISOString()}::timestamptz
        from unnest(${`{${due.map((d) => d.id).join(',')}}`}::text[], ${`{${due.map((d) => d.version).join(',')}}`}::text[])
             as d(id, version)
       where c.id = d.id and c.xmin::text = d.version
         and not exists (select 1 from graphile_worker._private_jobs j
                          where j.key = 'poll:' || c.id and (j.locked_at is not null or j.attempts < j.max_attempts))
      returning c.id)
    select id, (graphile_worker.add_job('poll_connector', json_build_object('connectorId', id),
                  job_key => 'poll:' || id, max_attempts => 3)).id as job_id
    from claimed`);
  return { scheduled: scheduled.map((r) => r.id), requeued };
}

/** A step of a poll that failed, with a code and a message that carry no personal data (graphile-worker stores it). */
class PollStepError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/** The connector was edited while it was polled: the job fails so that its retry polls with the new settings. */
class ConnectorChangedError extends Error {
  constructor() {
    super('connector changed during the poll; polling again');
  }
}

/** Longest failure message kept (ours are far shorter; a host name is the only thing of variable length in them). */
const POLL_ERROR_MESSAGE_MAX = 300;

/**
 * What a failed poll records for admins: a code and a message with no personal data and no secret. Only messages
 * written for admins are kept (the adapter's CheckFailed and the outbound client's errors, which name a host at
 * most, and our own steps'); anything else is known by its code (a SQLSTATE, a driver code) or its class, as a
 * report's unexpected adapter error is: a database message quotes its query's parameters, a vendor's body anything.
 */
function pollFailureOf(err: unknown): { code: string; message: string } {
  const failure = ((): { code: string; message: string } => {
    if (err instanceof PollStepError || err instanceof CheckFailed) return { code: err.code, message: err.message };
    if (err instanceof OutboundError) return { code: `upstream_${err.code}`, message: err.message };
    if (err instanceof SealError) return { code: 'secrets_unreadable', message: SECRETS_UNREADABLE };
    const code = safeErrorCode(err);
    if (pgCode(err)) return { code, message: `database error (${code}); the poll will be retried` };
    if (code !== 'internal_error') return { code, message: `poll failed (${code})` };
    return { code, message: `unexpected error (${err instanceof Error ? err.name : 'unknown'})` };
  })();
  return { code: failure.code.slice(0, 64), message: failure.message.slice(0, POLL_ERROR_MESSAGE_MAX) };
}

type PolledConnector = { id: string; workspaceId: string; version: string };

/**
 * The poll starts: recorded only while the connector is as the poll read it (never for one deleted meanwhile). Gives
 * the cursor the last successful poll left (where this one goes on), null if none.
 */
async function recordPollStart(deps: UpstreamDeps, connector: PolledConnector): Promise<JsonValue | null> {
  const [row] = await deps.db.execute<{ poll_cursor: JsonValue | null }>(sql`
    insert into ${connectorPollStatus} (connector_id, last_started_at)
    select ${connector.id}, now() where ${connectorIsCurrent(connector)}
    on conflict (connector_id) do update set last_started_at = excluded.last_started_at
    returning poll_cursor`);
  return row?.poll_cursor ?? null;
}

/**
 * The poll succeeded, in one statement and only if the connector is still as the poll read it: its status with the
 * cursor the next poll goes on from, the connector's last_polled_at (the interval runs from here) and, if it finished
 * a read of the whole pending list (`complete`), its count of such reads, and the refused jobs it listed (`seen`,
 * memory keys, see refusalMemoryKey) as seen now, by the read this poll is part of: the count once that read is
 * complete, this poll's or a later one's (the refusals' prune goes by both: a job a read found counts as not found by
 * the whole reads after it only). False if not: what this poll found is about a connector that has changed since, and
 * none of it is recorded.
 */
async function recordPollSuccess(
  deps: UpstreamDeps,
  connector: PolledConnector,
  outcome: { seen: string[]; complete: boolean; cursor: JsonValue | null },
): Promise<boolean> {
  const { seen, complete, cursor } = outcome;
  // The connector's row is updated first, with the version check in its own WHERE: an admin's change that commits
  // while this statement waits for the row is then seen (the check is made again on the row as changed, and fails),
  // where a check in a subquery would still see the row as it was when the statement began.
  const rows = await deps.db.execute(sql`
    with polled as (
      update ${connectors} set last_polled_at = now(), complete_polls = complete_polls + ${complete ? 1 : 0}::int
       where id = ${connector.id} and ${rowVersion} = ${connector.version} and enabled and deleted_at is null
         and exists (select 1 from ${connectorPollStatus} where connector_id = ${connector.id})
      returning complete_polls),
    status as (
      update ${connectorPollStatus}
         set last_succeeded_at = now(), consecutive_failures = 0, poll_cursor = ${cursor === null ? null : JSON.stringify(cursor)}::jsonb
       where connector_id = ${connector.id} and exists (select 1 from polled)
      returning connector_id),
    listed as (
      update ${upstreamRefusals} r set last_seen_at = now(), last_seen_poll = polled.complete_polls + ${complete ? 0 : 1}::int
        from polled
       where r.connector_id = ${connector.id}
         and r.job_key in (select json_array_elements_text(${JSON.stringify(seen)}::json)))
    select 1 from polled, status`);
  return rows.length > 0;
}

/**
 * The poll failed: its code and message, one more failure in a row. Only if the connector is still as the poll read
 * it: a poll of settings an admin has changed since (or of a connector disabled or deleted) says nothing about the
 * connector now. Never throws: the poll's own error is what the job reports.
 */
async function recordPollFailure(deps: UpstreamDeps, connector: PolledConnector, err: unknown): Promise<void> {
  const { code, message } = pollFailureOf(err);
  deps.logger.warn({ connectorId: connector.id, errorCode: code }, 'connector poll failed');
  try {
    await deps.db
      .update(connectorPollStatus)
      .set({
        lastFailedAt: sql`now()`,
        lastErrorCode: code,
        lastErrorMessage: message,
        consecutiveFailures: sql`${connectorPollStatus.consecutiveFailures} + 1`,
      })
      .where(and(eq(connectorPollStatus.connectorId, connector.id), connectorIsCurrent(connector)));
  } catch (recordErr) {
    deps.logger.warn({ connectorId: connector.id, errorCode: safeErrorCode(recordErr) }, 'poll failure not recorded');
  }
}

/**
 * Pull mode: asks the vendor for pending tickets and feeds each to the same receiving path as webhooks (one
 * transaction per ticket, so one bad ticket cannot hold back the rest). Tickets already received are no-ops. Its
 * start and its outcome are recorded in connector_poll_status for admins.
 */
export async function pollConnector(deps: UpstreamDeps, connectorId: string): Promise<{ received: number; new: number }> {
  const current = () =>
    deps.db
      .select({ ...getTableColumns(connectors), version: rowVersion })
      .from(connectors)
      .where(and(eq(connectors.id, connectorId), eq(connectors.enabled, true), isNull(connectors.deletedAt)));
  const [row] = await current();
  if (!row) return { received: 0, new: 0 };
  // A job queued before the connector was switched back to webhooks (pull mode off) finds nothing to do.
  if (pollIntervalOf(row) === null) return { received: 0, new: 0 };
  const connector = { id: row.id, workspaceId: row.workspaceId, version: row.version };
  // Disabled or deleted: stop here. Edited: fail the job, so its retry polls again with the new settings.
  const stale = async (done: { received: number; new: number }) => {
    if ((await current()).length === 0) {
      deps.logger.info({ connectorId, ...done }, 'connector disabled during the poll; the rest of it dropped');
      return done;
    }
    deps.logger.info({ connectorId }, 'connector changed during the poll; it will be polled again');
    throw new ConnectorChangedError();
  };
  const cursor = await recordPollStart(deps, connector);
  try {
    const outcome = await pollOnce(deps, row, connector, cursor);
    if ('stale' in outcome) return await stale(outcome.stale);
    const done = { received: outcome.received, new: outcome.new };
    if (!(await recordPollSuccess(deps, connector, outcome))) return await stale(done);
    deps.logger.info({ connectorId, vendor: row.vendor, ...done, refused: outcome.refused }, 'connector polled');
    return done;
  } catch (err) {
    if (!(err instanceof ConnectorChangedError)) await recordPollFailure(deps, connector, err);
    throw err;
  }
}

/**
 * One poll of a connector read at `polled.version`, going on from `cursor`: what it listed and stored (with the refused
 * jobs it listed, whether it finished a read of the whole pending list and where the next poll goes on, for
 * recordPollSuccess), or where it found the connector changed.
 */
async function pollOnce(
  deps: UpstreamDeps,
  row: ConnectorRow,
  polled: PolledConnector,
  cursor: JsonValue | null,
): Promise<
  | { received: number; new: number; refused: number; seen: string[]; complete: boolean; cursor: JsonValue | null }
  | { stale: { received: number; new: number } }
> {
  const connectorId = polled.id;
  const opened = openConnector(deps.sealer, row);
  const { adapter, instance } = opened;
  const { tickets, unreadable, complete, cursor: next } = await adapter.poll!(instance, adapterContext(deps), cursor);
  // Each ticket is stored only while the connector is still as the poll read it: one disabled, deleted or edited
  // meanwhile (a poll may take minutes) takes nothing more from this poll, as a webhook verified with it would not.
  const connector = { ...polled, laterOutcome: adapter.laterOutcome };
  let fresh = 0;
  let refused = 0;
  // The refused jobs this poll listed, whether told now, before, or not yet: remembered while Transcend lists them.
  const seen: string[] = [];
  // Once a refusal could not be told for now (Sombra down, 429), the others wait for the next poll too: a poll is not
  // held up by one timing-out call per refused job.
  let reportsDeferred = false;
  // A job we refuse is told so upstream once (the vendor's admin sees why it does not progress), never by identifier.
  const refuse = async (job: { key: string; secret: string | undefined }, refusal: Refusal, extra: Record<string, unknown>) => {
    refused++;
    seen.push(refusalMemoryKey(deps, connectorId, job.key));
    let upstream: RefusalReport | 'deferred' = 'deferred';
    if (!reportsDeferred) {
      try {
        upstream = await reportRefusal(deps, connector, opened, job, refusal);
      } catch (err) {
        if (err instanceof StaleConnectorError) throw err;
        const errorCode = safeErrorCode(err);
        deps.logger.warn({ connectorId, code: refusal.code, errorCode }, 'polled ticket refused; recording it failed, the poll will be retried');
        throw new PollStepError(errorCode, `refused ticket not recorded (${errorCode})`);
      }
      reportsDeferred = upstream === 'retry_later';
    }
    const known = upstream === 'already_reported' || upstream === 'report_refused';
    deps.logger[known ? 'info' : 'warn']({ connectorId, code: refusal.code, ...extra, upstream }, 'polled ticket refused');
  };
  try {
    for (const ticket of tickets) {
      let refusal: Refusal | undefined;
      let errorCode: string | undefined;
      try {
        const [result] = await receiveTickets(deps, connector, [ticket], {}, '');
        if (result && !result.replayed) fresh++;
        continue;
      } catch (err) {
        if (err instanceof StaleConnectorError) throw err;
        // A ticket we refuse (e.g. reused id with another subject) or one holding a value the database cannot store
        // (a NUL character: a webhook gets a 400 for it) must not hold back the others; transient errors still fail
        // the job so it is retried.
        refusal = refusalOf(err);
        if (!refusal) {
          // graphile-worker logs and stores the thrown message: a failed query's carries its parameters, the
          // subject's identifier among them. Give it a code only.
          const code = safeErrorCode(err);
          deps.logger.warn({ connectorId, errorCode: code }, 'polled ticket not stored; the poll will be retried');
          throw new PollStepError(code, `polled ticket not stored (${code})`);
        }
        if (isUnstorableValue(err)) errorCode = pgCode(err);
      }
      await refuse({ key: storedTicketKey(deps, connector, ticket), secret: ticket.secret }, refusal, errorCode ? { errorCode } : {});
    }
    for (const job of unreadable) {
      const fields = job.invalid.length === 1 ? `field ${job.invalid[0]} is` : `fields ${job.invalid.join(', ')} are`;
      const refusal = { code: 'validation_failed', message: `the pending request's ${fields} missing or invalid` };
      await refuse({ key: job.jobKey, secret: job.secret }, refusal, { invalid: job.invalid });
    }
  } catch (err) {
    if (err instanceof StaleConnectorError) return { stale: { received: tickets.length, new: fresh } };
    throw err;
  }
  return { received: tickets.length, new: fresh, refused, seen, complete, cursor: next ?? null };
}
