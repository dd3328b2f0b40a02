import { and, eq, sql } from 'drizzle-orm';
import { dsrRequests } from '../db/schema/index.ts';
import type { Db } from '../db/client.ts';
import { isUniqueViolation } from '../db/errors.ts';
import { ApiError } from '../lib/errors.ts';
import type { Actor, PrivacyDeps } from './context.ts';
import { subjectSealContext } from './execute.ts';
import { addJob, executeJob, type DsrRequest } from './intake.ts';
import { resetTicketsForRetry, ticketsOf, type TicketRow } from '../upstream/tickets.ts';
import type { UpstreamDeps } from '../upstream/context.ts';

/**
 * Runs a failed request again (e.g. after the cause was fixed): it goes back to queued with its sealed identifier
 * restored and a fresh attempt budget, and its job is queued in the same transaction. The failed attempt's audit
 * record stays in the chain; the retry writes its own, naming `actor` (who asked for the retry) when given.
 *
 * Vendor tickets still waiting (pending) or whose delivery failed report the new outcome once it is known; so does a
 * ticket already told about the failure when its vendor takes a later outcome at once (OneTrust, DataGrail), while
 * one whose vendor needs a fresh capability for it hears the new outcome when it sends or lists the job again
 * (Transcend; receiveTickets): each adapter declares which (Connector.laterOutcome; resetTicketsForRetry).
 * A report of the failure still in flight records nothing when it ends, and the new outcome goes out after it
 * (resetForNewOutcome).
 */
export async function retryRequest(
  ctx: PrivacyDeps & Pick<UpstreamDeps, 'reportPolicy'>,
  workspaceId: string,
  requestId: string,
  actor?: Actor,
): Promise<{ request: DsrRequest; tickets: TicketRow[] }> {
  try {
    return await ctx.db.transaction(async (tx) => {
      const [req] = await tx
        .select()
        .from(dsrRequests)
        .where(and(eq(dsrRequests.id, requestId), eq(dsrRequests.workspaceId, workspaceId)))
        .for('update');
      if (!req) throw new ApiError('not_found', 'no such request in this workspace');
      if (req.status !== 'failed') throw new ApiError('conflict', `only a failed request can be retried (this one is ${req.status})`);
      if (req.scope === 'user' && !req.subjectSealed) {
        throw new ApiError(
          'conflict',
          'the identifier of this request is no longer kept (past the retention period); submit a new request',
        );
      }
      const subjectValue = req.subjectSealed ? ctx.sealer.open(req.subjectSealed, subjectSealContext(req.id)) : null;
      const [queued] = await tx
        .update(dsrRequests)
        .set({
          status: 'queued',
          outcome: null,
          errorCode: null,
          attempts: 0,
          subjectValue,
          subjectSealed: null,
          ...(actor ? { actorType: actor.type, actorId: actor.id } : {}),
          startedAt: null,
          finishedAt: null,
          updatedAt: sql`now()`,
        })
        .where(eq(dsrRequests.id, req.id))
        .returning();
      await resetTicketsForRetry(tx, ctx.reportPolicy, req.id);
      await tx.execute(sql`select ${addJob(executeJob(ctx, req.id))}`);
      // Read in this transaction, so the caller's view of the request and its tickets is the state it committed.
      const tickets = (await ticketsOf(tx, [req.id])).get(req.id) ?? [];
      ctx.logger.info({ requestId: req.id, action: req.action, scope: req.scope }, 'request retry queued');
      return { request: queued!, tickets };
    });
  } catch (err) {
    // Another request for the same subject is pending: that one will do the work.
    if (isUniqueViolation(err)) {
      throw new ApiError('conflict', 'another request for the same subject and action is pending; wait for it instead');
    }
    throw err;
  }
}

/** Wipes the sealed identifiers of requests that failed longer ago than the retention period (periodic tick). */
export async function pruneSealedSubjects(ctx: Pick<PrivacyDeps, 'db'>, retentionDays: number): Promise<number> {
  const rows = await sealedSubjectsPrune(ctx.db, retentionDays).returning({ id: dsrRequests.id });
  return rows.length;
}

/** The prune's statement (its plan is checked in test/integration/query-plans.test.ts). */
export function sealedSubjectsPrune(db: Db, retentionDays: number) {
  return db
    .update(dsrRequests)
    .set({ subjectSealed: null })
    .where(
      and(
        eq(dsrRequests.status, 'failed'),
        sql`${dsrRequests.subjectSealed} is not null`,
        sql`${dsrRequests.finishedAt} < now() - make_interval(days => ${retentionDays}::int)`,
      ),
    );
}
