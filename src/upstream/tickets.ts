import { createHash } from 'node:crypto';
import { and, eq, sql, type SQL } from 'drizzle-orm';
import type { DsrTicket, Verified } from '../../connectors/types.ts';
import type { DbOrTx, Tx } from '../db/client.ts';
import { lockKeys } from '../db/locks.ts';
import { dsrRequests, upstreamTickets, webhookTokens } from '../db/schema/index.ts';
import { lockKey, subjectDigest } from '../lib/digest.ts';
import { ApiError } from '../lib/errors.ts';
import { newId } from '../lib/ids.ts';
import type { Actor } from '../privacy/context.ts';
import { intakeInTx, logCreated } from '../privacy/intake.ts';
import type { UpstreamDeps } from './context.ts';

export type TicketRow = typeof upstreamTickets.$inferSelect;

export interface ReceivedTicket {
  ticketId: string;
  requestId: string;
  /** The same ticket was received before: nothing new was stored. */
  replayed: boolean;
}

/** How long a token id is remembered when the token itself does not say (it then cannot be replayed later). */
const DEFAULT_TOKEN_MEMORY_MS = 24 * 60 * 60 * 1000;

export const ticketSecretContext = (ticketId: string) => `ticket:${ticketId}:secret`;

/**
 * Stores tickets from one webhook (or one polled item) and their requests in one transaction: the vendor is answered
 * only after this commits. A redelivered ticket (same connector and ticket key) changes nothing and gets the same
 * answer; copies arriving at once are serialised on a lock per ticket key. A ticket whose subject already has a
 * pending request of the same action joins that request and is reported when it finishes.
 */
export async function receiveTickets(
  deps: UpstreamDeps,
  connector: { id: string; workspaceId: string },
  tickets: DsrTicket[],
  verified: Verified,
  rawBody: string,
): Promise<ReceivedTicket[]> {
  const actor: Actor = { type: 'connector', id: connector.id, source: 'connector' };
  const created: Parameters<typeof logCreated>[2][] = [];
  const results = await deps.db.transaction(async (tx) => {
    if (verified.tokenId) await rememberToken(tx, connector.id, verified, rawBody);
    await lockKeys(
      tx,
      'exclusive',
      tickets.map((t) => lockKey('ticket', connector.id, t.ticketKey)),
    );
    const out: ReceivedTicket[] = [];
    for (const t of tickets) {
      const digest = subjectDigest(deps.digestKey, connector.workspaceId, t.subject.kind, t.subject.value);
      const [existing] = await tx
        .select()
        .from(upstreamTickets)
        .where(and(eq(upstreamTickets.connectorId, connector.id), eq(upstreamTickets.ticketKey, t.ticketKey)));
      if (existing) {
        if (existing.action !== t.action || existing.subjectDigest !== digest) {
          throw new ApiError('conflict', 'this ticket was already received with a different action or subject');
        }
        // A redelivery (or the next poll) may carry a fresh capability; the newest one is the one to report with.
        const context = ticketSecretContext(existing.id);
        if (
          t.secret &&
          existing.status !== 'delivered' &&
          (!existing.secretSealed || deps.sealer.open(existing.secretSealed, context) !== t.secret)
        ) {
          await tx
            .update(upstreamTickets)
            .set({ secretSealed: deps.sealer.seal(t.secret, context), updatedAt: sql`now()` })
            .where(eq(upstreamTickets.id, existing.id));
        }
        out.push({ ticketId: existing.id, requestId: existing.requestId, replayed: true });
        continue;
      }
      const result = await intakeInTx(tx, deps, actor, {
        workspaceId: connector.workspaceId,
        action: t.action,
        scope: 'user',
        subject: t.subject,
        upstreamRef: t.upstreamRef.slice(0, 500),
        dedupeKey: `connector:${connector.id}:${t.ticketKey}`.slice(0, 500),
      });
      if (result.result === 'created') created.push(result);
      const ticketId = newId('tkt');
      await tx.insert(upstreamTickets).values({
        id: ticketId,
        workspaceId: connector.workspaceId,
        connectorId: connector.id,
        ticketKey: t.ticketKey,
        requestId: result.request.id,
        action: t.action,
        subjectDigest: digest,
        upstreamRef: t.upstreamRef,
        upstream: t.upstream,
        secretSealed: t.secret ? deps.sealer.seal(t.secret, ticketSecretContext(ticketId)) : null,
      });
      if (result.result !== 'created') await reportIfAlreadyFinished(tx, result.request.id, ticketId);
      out.push({ ticketId, requestId: result.request.id, replayed: false });
    }
    return out;
  });
  for (const c of created) logCreated(deps, actor, c);
  return results;
}

/**
 * A signed token may only ever carry the body it was first seen with: the same message again is a harmless
 * redelivery, the same token on another body is a replay.
 */
async function rememberToken(tx: Tx, connectorId: string, verified: Verified, rawBody: string): Promise<void> {
  const bodyDigest = createHash('sha256').update(rawBody).digest('hex');
  const expiresAt = verified.tokenExpiresAt ?? new Date(Date.now() + DEFAULT_TOKEN_MEMORY_MS);
  const inserted = await tx
    .insert(webhookTokens)
    .values({ connectorId, tokenId: verified.tokenId!, bodyDigest, expiresAt })
    .onConflictDoNothing()
    .returning({ bodyDigest: webhookTokens.bodyDigest });
  if (inserted.length > 0) return;
  const [seen] = await tx
    .select({ bodyDigest: webhookTokens.bodyDigest })
    .from(webhookTokens)
    .where(and(eq(webhookTokens.connectorId, connectorId), eq(webhookTokens.tokenId, verified.tokenId!)));
  if (seen && seen.bodyDigest !== bodyDigest) {
    throw new ApiError('token_replayed', 'this signed token was already used for a different request');
  }
}

/**
 * A ticket that joined an existing request must still be reported when that request finishes. Locking the request
 * row makes this exact: if it is not finished yet, its completion (an UPDATE of this row) waits for our commit and
 * then sees this ticket; if it is finished, nobody else will report us, so we enqueue the report here.
 */
async function reportIfAlreadyFinished(tx: Tx, requestId: string, ticketId: string): Promise<void> {
  const [row] = await tx
    .select({ status: dsrRequests.status })
    .from(dsrRequests)
    .where(eq(dsrRequests.id, requestId))
    .for('share');
  if (row && (row.status === 'complete' || row.status === 'failed')) await enqueueReports(tx, { ticketId });
}

/**
 * Adds the next report_upstream job of every pending ticket of a request (or of one ticket). Job keys carry the
 * attempt number, so enqueueing twice is harmless and each retry is a job of its own.
 */
export async function enqueueReports(tx: DbOrTx, which: { requestId: string } | { ticketId: string }): Promise<void> {
  await addReportJobs(tx, 'requestId' in which ? sql`t.request_id = ${which.requestId}` : sql`t.id = ${which.ticketId}`);
}

/**
 * Safety net run by the cron tick: a ticket of a finished request still pending long after its next attempt was due
 * has lost its job (e.g. the job itself failed on every try while the database was down). Adding it again under the
 * same key revives a failed job; a delivered or failed ticket is never touched.
 */
export async function requeueStalledReports(db: DbOrTx, stalledForMinutes: number): Promise<number> {
  return addReportJobs(
    db,
    sql`exists (select 1 from ${dsrRequests} r where r.id = t.request_id and r.status in ('complete', 'failed')
              and coalesce(t.next_attempt_at, r.finished_at) < now() - make_interval(mins => ${stalledForMinutes}::int))`,
  );
}

async function addReportJobs(db: DbOrTx, cond: SQL): Promise<number> {
  const rows = await db.execute(sql`
    select graphile_worker.add_job('report_upstream',
             json_build_object('ticketId', t.id, 'attempt', t.attempts + 1),
             job_key => 'report:' || t.id || ':' || (t.attempts + 1),
             max_attempts => 3,
             -- Ahead of queued erasures: the work is done, only the proof is waiting to go out.
             priority => -1)
    from ${upstreamTickets} t
    where t.status = 'pending' and ${cond}`);
  return rows.length;
}
