import { and, eq, sql } from 'drizzle-orm';
import type { JsonValue, ReportResult, StoredTicket, TicketAction, TicketOutcome } from '../../connectors/types.ts';
import { auditRecords, connectors, dsrRequests, jobOutbox, upstreamTickets } from '../db/schema/index.ts';
import { pgCode } from '../db/errors.ts';
import { z } from 'zod';
import type { ReportPolicy, UpstreamDeps } from './context.ts';
import { adapterContext, openConnectorAt, rowVersion } from './store.ts';
import { ApiError } from '../lib/errors.ts';
import type { HttpClient } from '../lib/outbound.ts';
import { enqueueReports, resetForNewOutcome, ticketSecretContext, type TicketRow } from './tickets.ts';
import { commitWithoutFlush, p, prebuilt } from '../db/prebuilt.ts';

export type DeliveryResult =
  | { kind: 'skipped'; reason: 'missing' | 'not_pending' | 'stale_attempt' | 'request_not_finished' | 'held' | 'superseded' }
  | { kind: 'delivered' | 'failed'; error?: string }
  | { kind: 'retry_scheduled'; error: string; delayMs: number };

/**
 * Delay before attempt `attempt + 1`: exponential from the base, capped. A vendor's Retry-After is the least wait: a
 * longer one wins (capped too), a shorter one does not cut the backoff (a vendor answering `Retry-After: 1` to every
 * attempt would otherwise use up the whole attempt budget, meant to span about a day, in seconds).
 */
export function retryDelayMs(
  policy: Pick<ReportPolicy, 'backoffBaseMs' | 'backoffMaxMs'>,
  attempt: number,
  retryAfterMs?: number,
  random = Math.random,
): number {
  const exp = policy.backoffBaseMs * 2 ** (attempt - 1);
  // ±10% jitter so tickets failed by one outage do not all come back in the same second; the cap is a hard limit.
  const backoff = Math.round(exp * (0.9 + 0.2 * random()));
  return Math.min(Math.max(backoff, retryAfterMs ?? 0), policy.backoffMaxMs);
}

/** What a report reads: only the columns it uses (building and mapping whole rows of four tables cost more CPU). */
const t = upstreamTickets;
const r = dsrRequests;
const c = connectors;
const reportColumns = {
  ticket: {
    id: t.id,
    ticketKey: t.ticketKey,
    upstreamRef: t.upstreamRef,
    upstream: t.upstream,
    secretSealed: t.secretSealed,
    action: t.action,
    status: t.status,
    attempts: t.attempts,
    generation: t.generation,
    nextAttemptAt: t.nextAttemptAt,
    reportedAuditRecordId: t.reportedAuditRecordId,
    /** A first attempt after a reset waits for next_attempt_at (resetForNewOutcome); judged on the database's clock. */
    held: sql<boolean>`${t.attempts} = 0 and ${t.nextAttemptAt} > now()`,
  },
  request: { id: r.id, status: r.status, outcome: r.outcome, auditRecordId: r.auditRecordId, errorCode: r.errorCode },
  connector: {
    id: c.id,
    workspaceId: c.workspaceId,
    vendor: c.vendor,
    config: c.config,
    secretsSealed: c.secretsSealed,
    deletedAt: c.deletedAt,
    version: rowVersion,
  },
  counts: auditRecords.counts,
};

const reportSource = prebuilt((b) =>
  b
    .select(reportColumns)
    .from(t)
    .innerJoin(r, eq(r.id, t.requestId))
    .innerJoin(c, eq(c.id, t.connectorId))
    .leftJoin(auditRecords, eq(auditRecords.id, r.auditRecordId))
    .where(eq(t.id, p('ticketId'))),
);
type ReportSource = Awaited<ReturnType<typeof reportSource.run>>[number];

/**
 * Claims an outbox row by deleting it and reads what its report needs, in one statement (a row a dispatcher already
 * took is gone: nothing comes back). The claim is not flushed on its own: the ticket's recorded outcome, committed
 * after the call, makes it durable; should the database crash before that, the row is back and a report job makes
 * the attempt, as after a crash of this process.
 */
const claimAndLoad = prebuilt((b) => {
  const claimed = b
    .$with('claimed')
    .as(b.delete(jobOutbox).where(and(eq(jobOutbox.id, p('id')), commitWithoutFlush)).returning());
  return b
    .with(claimed)
    .select({
      claimed: {
        task: claimed.task,
        payload: claimed.payload,
        jobKey: claimed.jobKey,
        maxAttempts: claimed.maxAttempts,
        priority: claimed.priority,
      },
      ...reportColumns,
    })
    .from(claimed)
    .leftJoin(t, eq(t.id, sql`${claimed.payload} ->> 'ticketId'`))
    .leftJoin(r, eq(r.id, t.requestId))
    .leftJoin(c, eq(c.id, t.connectorId))
    .leftJoin(auditRecords, eq(auditRecords.id, r.auditRecordId));
});

/**
 * The ticket as the attempt found it: the result of an attempt is recorded only if nothing else was recorded for the
 * ticket meanwhile and it was not reset for a new outcome (a retry of its request), which would otherwise be lost.
 */
const asAttemptFound = (params: { ticketId: unknown; generation: unknown; attempt: unknown }) =>
  and(
    eq(upstreamTickets.id, params.ticketId as never),
    eq(upstreamTickets.status, 'pending'),
    eq(upstreamTickets.generation, params.generation as never),
    sql`${upstreamTickets.attempts} = ${params.attempt}::int - 1`,
  );

/** One statement, committed on its own. The per-ticket capability (e.g. a nonce) has served its purpose: wipe it. */
const markDelivered = prebuilt((b) =>
  b
    .update(upstreamTickets)
    .set({
      status: 'delivered',
      attempts: p('attempt') as never,
      deliveredAt: sql`now()`,
      reportedAuditRecordId: p('auditRecordId') as never,
      lastError: null,
      nextAttemptAt: null,
      secretSealed: null,
      updatedAt: sql`now()`,
    })
    .where(asAttemptFound({ ticketId: p('ticketId'), generation: p('generation'), attempt: p('attempt') })),
);

/**
 * One delivery attempt of a ticket's report. Runs only for finished requests (the completion enqueues it). The
 * outcome is recorded on the ticket in the same transaction that schedules the next attempt, so a report is never
 * dropped silently: it ends delivered, or failed with its last error for an operator to see.
 */
export async function deliverReport(deps: UpstreamDeps, ticketId: string, attempt: number): Promise<DeliveryResult> {
  const startedAt = Date.now();
  const [row] = await reportSource.run(deps.db, { ticketId });
  return deliverLoaded(deps, ticketId, attempt, row, startedAt);
}

/** `startedAt` (Date.now(), taken before the ticket was read): every vendor call is over by attemptTimeoutMs later. */
async function deliverLoaded(
  deps: UpstreamDeps,
  ticketId: string,
  attempt: number,
  row: ReportSource | undefined,
  startedAt: number,
): Promise<DeliveryResult> {
  if (!row) return { kind: 'skipped', reason: 'missing' };
  const { ticket, request, connector, counts } = row;
  if (ticket.status !== 'pending') return { kind: 'skipped', reason: 'not_pending' };
  if (ticket.attempts + 1 !== attempt) return { kind: 'skipped', reason: 'stale_attempt' };
  if ((request.status !== 'complete' && request.status !== 'failed') || !request.auditRecordId) {
    return { kind: 'skipped', reason: 'request_not_finished' };
  }
  const log = deps.logger.child({ ticketId, requestId: request.id, connectorId: connector.id, vendor: connector.vendor, attempt });
  const generation = ticket.generation;
  // The vendor was told an earlier outcome (a failure, before a retry of the request): this report supersedes it.
  const supersedes =
    ticket.reportedAuditRecordId && ticket.reportedAuditRecordId !== request.auditRecordId ? ticket.reportedAuditRecordId : undefined;
  if (ticket.held && ticket.nextAttemptAt) {
    // The ticket was reset for a new outcome while a report of the old one may have been on its way: wait until that
    // attempt is surely over, so the vendor hears the new outcome last. The job key is this attempt's own (a running
    // job's key is handed over to the new job).
    await deps.db.execute(sql`
      select graphile_worker.add_job('report_upstream',
               json_build_object('ticketId', ${ticketId}::text, 'attempt', ${attempt}::int),
               run_at => ${ticket.nextAttemptAt.toISOString()}::timestamptz,
               job_key => ${`report:${ticketId}:${attempt}`}::text,
               max_attempts => 3)`);
    log.info({ until: ticket.nextAttemptAt.toISOString() }, 'report held until an earlier attempt is surely over');
    return { kind: 'skipped', reason: 'held' };
  }

  let result: ReportResult;
  if (connector.deletedAt || !connector.secretsSealed) {
    result = { kind: 'permanent', error: 'connector_deleted: the connector was deleted before the report was delivered' };
  } else {
    const outcome: TicketOutcome = {
      requestId: request.id,
      auditRecordId: request.auditRecordId,
      status: request.status,
      outcome: request.outcome ?? 'failed',
      counts: (counts ?? {}) as Record<string, number>,
      errorCode: request.errorCode,
    };
    try {
      // Unsealed in here: a capability that cannot be opened (a key removed too early) is a failed attempt that ends
      // in a visible failure, not a job that throws until the safety net requeues it forever.
      const stored: StoredTicket = {
        id: ticket.id,
        ticketKey: ticket.ticketKey,
        upstreamRef: ticket.upstreamRef,
        upstream: ticket.upstream as Record<string, JsonValue>,
        secret: ticket.secretSealed ? deps.sealer.open(ticket.secretSealed, ticketSecretContext(ticket.id)) : null,
        action: ticket.action as TicketAction,
        attempt,
        ...(supersedes ? { supersedes } : {}),
      };
      const { adapter, instance } = openConnectorAt(deps.sealer, connector);
      const ctx = adapterContext(deps);
      const http = withDeadline(ctx.http, startedAt + deps.reportPolicy.attemptTimeoutMs);
      result = await adapter.report(stored, outcome, instance, { ...ctx, http });
    } catch (err) {
      // Adapters classify HTTP outcomes themselves; anything thrown is our bug or bad stored config. Retry (it may
      // be fixed by a deploy or a config change) and say only the error's class, which carries no data.
      result = { kind: 'retry', error: `adapter error (${err instanceof Error ? err.name : 'unknown'})` };
    }
  }

  const policy = deps.reportPolicy;
  const outOfAttempts = result.kind === 'retry' && attempt >= policy.maxAttempts;
  const delayMs = result.kind === 'retry' ? retryDelayMs(policy, attempt, result.retryAfterMs) : 0;
  let error = result.kind === 'delivered' ? null : outOfAttempts ? `gave up after ${attempt} attempts: ${result.error}` : result.error;
  if (supersedes && (result.kind === 'permanent' || outOfAttempts)) {
    // The ticket ends failed, but the vendor did hear the earlier outcome: say so, so the failure is read right.
    error = `${error}; the earlier report (audit record ${supersedes}) was delivered, this later outcome was not`;
  }

  const found = asAttemptFound({ ticketId, generation, attempt });
  let recorded: boolean;
  if (result.kind === 'delivered') {
    recorded = (await markDelivered.run(deps.db, { ticketId, generation, attempt, auditRecordId: request.auditRecordId })).count > 0;
  } else if (result.kind === 'permanent' || outOfAttempts) {
    const rows = await deps.db
      .update(upstreamTickets)
      .set({ status: 'failed', attempts: attempt, lastError: error, nextAttemptAt: null, updatedAt: sql`now()` })
      .where(found)
      .returning({ id: upstreamTickets.id });
    recorded = rows.length > 0;
  } else {
    // The next attempt is recorded and scheduled in one transaction.
    recorded = await deps.db.transaction(async (tx) => {
      const runAt = new Date(Date.now() + delayMs);
      const rows = await tx
        .update(upstreamTickets)
        .set({ attempts: attempt, lastError: error, nextAttemptAt: runAt, updatedAt: sql`now()` })
        .where(found)
        .returning({ id: upstreamTickets.id });
      if (rows.length === 0) return false;
      await tx.execute(sql`
        select graphile_worker.add_job('report_upstream',
                 json_build_object('ticketId', ${ticketId}::text, 'attempt', ${attempt + 1}::int),
                 run_at => ${runAt.toISOString()}::timestamptz,
                 job_key => ${`report:${ticketId}:${attempt + 1}`}::text,
                 max_attempts => 3)`);
      return true;
    });
  }

  if (!recorded) {
    // The ticket was reset for a new outcome (its request retried) while this attempt was out, or another attempt
    // recorded first: this result is not the ticket's any more. A reset ticket reports its new outcome after this.
    log.info({ result: result.kind }, 'report result not recorded: the ticket changed while the attempt was out');
    return { kind: 'skipped', reason: 'superseded' };
  }

  if (result.kind === 'delivered') {
    log.info('report delivered');
    return { kind: 'delivered' };
  }
  if (result.kind === 'permanent' || outOfAttempts) {
    log.error({ error }, 'report failed; will not retry');
    return { kind: 'failed', error: error! };
  }
  log.warn({ error, delayMs }, 'report not delivered; will retry');
  return { kind: 'retry_scheduled', error: error!, delayMs };
}

/**
 * Delivers reports whose jobs are still in the job outbox right away, in the job that finished their request, instead
 * of waiting for a worker slot to pick up a report job. Each outbox row is claimed by deleting it (a row a
 * dispatcher already took is left to its job), so a report is attempted here or by its job, never both. If the
 * attempt throws, the row is put back for a job to make it; should this process die between the claim and the
 * recorded outcome, the ticket stays pending and the connectors tick re-queues it (requeueStalledReports).
 */
export async function reportNow(deps: UpstreamDeps, outboxIds: number[]): Promise<void> {
  for (const id of outboxIds) {
    const startedAt = Date.now();
    const [row] = await claimAndLoad.run(deps.db, { id });
    if (!row) continue;
    const p = reportPayload.safeParse(row.claimed.payload);
    if (!p.success) continue;
    const { ticket, request, connector, counts } = row;
    try {
      await deliverLoaded(
        deps,
        p.data.ticketId,
        p.data.attempt,
        ticket && request && connector ? { ticket, request, connector, counts } : undefined,
        startedAt,
      );
    } catch (err) {
      deps.logger.warn({ errorCode: pgCode(err) ?? (err instanceof Error ? err.name : 'unknown') }, 'report left to its job');
      const { task, payload, jobKey, maxAttempts, priority } = row.claimed;
      await deps.db.insert(jobOutbox).values({ task, payload, jobKey, maxAttempts, priority });
      deps.outbox.kick();
    }
  }
}

/** What a report_upstream job carries (jobs outlive code and may be added from SQL: parse before trusting). */
export const reportPayload = z.object({
  ticketId: z.string().regex(/^tkt_[0-9a-z]{25}$/),
  attempt: z.number().int().min(1),
});

/**
 * An admin's second chance for a report that failed (vendor outage beyond the retry window, credentials fixed
 * since): the ticket goes back to pending with a fresh attempt budget and its first job is queued again.
 */
export async function redeliverTicket(deps: UpstreamDeps, workspaceId: string, ticketId: string): Promise<TicketRow> {
  const row = await deps.db.transaction(async (tx) => {
    const [row] = await tx
      .select()
      .from(upstreamTickets)
      .where(and(eq(upstreamTickets.id, ticketId), eq(upstreamTickets.workspaceId, workspaceId)))
      .for('update');
    if (!row) throw new ApiError('not_found', 'no such ticket in this workspace');
    if (row.status !== 'failed') throw new ApiError('conflict', `only a failed report can be redelivered (this one is ${row.status})`);
    // A deleted connector's secrets (and its tickets' capabilities) are gone: the report could only fail again.
    const [connector] = await tx
      .select({ deletedAt: connectors.deletedAt })
      .from(connectors)
      .where(eq(connectors.id, row.connectorId));
    if (!connector || connector.deletedAt) {
      throw new ApiError('conflict', "the ticket's connector was deleted: its report can no longer be delivered");
    }
    const [updated] = await tx
      .update(upstreamTickets)
      .set(resetForNewOutcome(deps.reportPolicy))
      .where(eq(upstreamTickets.id, ticketId))
      .returning();
    await enqueueReports(tx, { ticketId });
    deps.logger.info({ ticketId }, 'report redelivery requested');
    return updated!;
  });
  deps.outbox.kick();
  return row;
}

/** The client an attempt's adapter calls through: each call is over by `deadline` (the shared client stays open). */
function withDeadline(http: HttpClient, deadline: number): HttpClient {
  return {
    request: (url, init = {}) => http.request(url, { ...init, deadline: Math.min(init.deadline ?? Infinity, deadline) }),
    close: async () => {},
  };
}
