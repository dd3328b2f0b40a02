import { and, eq, getTableColumns, isNull, lt, sql } from 'drizzle-orm';
import { connectorFor } from '../../connectors/index.ts';
import { connectors, webhookTokens } from '../db/schema/index.ts';
import type { Refusal } from '../../connectors/types.ts';
import { isUnstorableValue, pgCode, safeErrorCode } from '../db/errors.ts';
import type { UpstreamDeps } from './context.ts';
import { adapterContext, openConnector, rowVersion, StaleConnectorError } from './store.ts';
import { recordPoll, refusalMemoryKey, refusalOf, reportRefusal, type RefusalReport } from './refusals.ts';
import { receiveTickets, requeueStalledReports, storedTicketKey } from './tickets.ts';

/** A pending report this long past due has lost its job; the tick adds it again. */
const STALLED_REPORT_MINUTES = 15;

/**
 * The cron fan-out (every minute): one poll_connector job per connector in pull mode whose interval has passed since
 * its last poll was scheduled or finished, and whose last poll job is over,
 * requeueing of reports whose jobs were lost, and pruning of expired webhook token ids.
 */
export async function connectorsTick(
  deps: UpstreamDeps,
  now = new Date(),
): Promise<{ scheduled: string[]; requeued: number }> {
  await deps.db.delete(webhookTokens).where(lt(webhookTokens.expiresAt, now));
  const requeued = await requeueStalledReports(deps.db, STALLED_REPORT_MINUTES);
  if (requeued > 0) {
    deps.outbox.kick();
    deps.logger.warn({ requeued }, 'requeued reports whose jobs were lost');
  }
  const rows = await deps.db
    .select({ id: connectors.id, vendor: connectors.vendor, config: connectors.config, lastPolledAt: connectors.lastPolledAt })
    .from(connectors)
    .where(and(eq(connectors.enabled, true), isNull(connectors.deletedAt)));
  const due: string[] = [];
  for (const row of rows) {
    const adapter = connectorFor(row.vendor);
    if (!adapter?.poll || !adapter.pollIntervalMinutes) continue;
    const parsed = adapter.configSchema.safeParse(row.config);
    const minutes = parsed.success ? adapter.pollIntervalMinutes(parsed.data) : null;
    if (minutes === null) continue;
    if (row.lastPolledAt && row.lastPolledAt.getTime() + minutes * 60_000 > now.getTime() + 1_000) continue;
    due.push(row.id);
  }
  if (due.length === 0) return { scheduled: [], requeued };
  // A poll is claimed when it is scheduled: the interval runs from there, so a poll that fails is tried again by its
  // own job (a few attempts) and then waits for its interval, not polled afresh every minute. A connector whose poll
  // job is still running or waiting for a retry gets none beside it (re-adding its key would start a second poll
  // next to a running one, or give a failing one a fresh attempt budget).
  const scheduled = await deps.db.execute<{ id: string }>(sql`
    with claimed as (
      update ${connectors} c set last_polled_at = ${now.toISOString()}::timestamptz
       where c.id = any(${`{${due.join(',')}}`}::text[])
         and not exists (select 1 from graphile_worker._private_jobs j
                          where j.key = 'poll:' || c.id and (j.locked_at is not null or j.attempts < j.max_attempts))
      returning c.id)
    select id, (graphile_worker.add_job('poll_connector', json_build_object('connectorId', id),
                  job_key => 'poll:' || id, max_attempts => 3)).id as job_id
    from claimed`);
  return { scheduled: scheduled.map((r) => r.id), requeued };
}

/**
 * Pull mode: asks the vendor for pending tickets and feeds each to the same receiving path as webhooks (one
 * transaction per ticket, so one bad ticket cannot hold back the rest). Tickets already received are no-ops.
 */
export async function pollConnector(deps: UpstreamDeps, connectorId: string): Promise<{ received: number; new: number }> {
  const current = () =>
    deps.db
      .select({ ...getTableColumns(connectors), version: rowVersion })
      .from(connectors)
      .where(and(eq(connectors.id, connectorId), eq(connectors.enabled, true), isNull(connectors.deletedAt)));
  const [row] = await current();
  if (!row) return { received: 0, new: 0 };
  const { adapter, instance } = openConnector(deps.sealer, row);
  // A job queued before the connector was switched back to webhooks (pull mode off) finds nothing to do.
  if (!adapter.poll || !adapter.pollIntervalMinutes || adapter.pollIntervalMinutes(instance.config) === null) {
    return { received: 0, new: 0 };
  }
  const { tickets, unreadable, complete } = await adapter.poll(instance, adapterContext(deps));
  // Each ticket is stored only while the connector is still as the poll read it: one disabled, deleted or edited
  // meanwhile (a poll may take minutes) takes nothing more from this poll, as a webhook verified with it would not.
  const connector = { id: row.id, workspaceId: row.workspaceId, version: row.version, laterOutcome: adapter.laterOutcome };
  const opened = { adapter, instance };
  let fresh = 0;
  // Disabled or deleted: stop here. Edited: fail the job, so its retry polls again with the new settings.
  const stale = async () => {
    if ((await current()).length === 0) {
      deps.logger.info({ connectorId, received: tickets.length, new: fresh }, 'connector disabled during the poll; the rest of it dropped');
      return { received: tickets.length, new: fresh };
    }
    deps.logger.info({ connectorId }, 'connector changed during the poll; it will be polled again');
    throw new Error('connector changed during the poll; polling again');
  };
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
        throw new Error(`refused ticket not recorded (${errorCode})`);
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
          throw new Error(`polled ticket not stored (${code})`);
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
    if (err instanceof StaleConnectorError) return await stale();
    throw err;
  }
  await recordPoll(deps, connectorId, seen, complete);
  deps.logger.info({ connectorId, vendor: row.vendor, received: tickets.length, new: fresh, refused }, 'connector polled');
  return { received: tickets.length, new: fresh };
}
