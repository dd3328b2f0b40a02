import { createHash } from 'node:crypto';
import { and, asc, eq, inArray, isNull, or, sql, type SQL } from 'drizzle-orm';
import type { PgTable } from 'drizzle-orm/pg-core';
import { CONNECTORS } from '../../connectors/index.ts';
import type { DsrTicket, LaterOutcome, Verified } from '../../connectors/types.ts';
import type { Db, DbOrTx, Tx } from '../db/client.ts';
import { inBatches, type PruneOptions } from '../db/prune.ts';
import { lockKeys } from '../db/locks.ts';
import { p, prebuiltSql, type Prebuilt } from '../db/prebuilt.ts';
import type postgres from 'postgres';
import { connectors, dsrRequests, jobOutbox, upstreamTickets, webhookTokens } from '../db/schema/index.ts';
import { lockKey, subjectDigest } from '../lib/digest.ts';
import { ApiError } from '../lib/errors.ts';
import { newId } from '../lib/ids.ts';
import type { Actor } from '../privacy/context.ts';
import {
  executeJob,
  intakeInputSchema,
  intakeInTx,
  logCreated,
  logQueued,
  newRequestRow,
  requestDigest,
  subjectSchema,
  type IntakeInput,
} from '../privacy/intake.ts';
import { columnOf, isUniqueViolation, pgCode } from '../db/errors.ts';
import { connectorIsCurrent, StaleConnectorError } from './store.ts';
import type { UpstreamDeps } from './context.ts';

export type TicketRow = typeof upstreamTickets.$inferSelect;

/** The vendor tickets of these requests, grouped by request id (oldest ticket first). */
export async function ticketsOf(db: DbOrTx, requestIds: string[]): Promise<Map<string, TicketRow[]>> {
  const byRequest = new Map<string, TicketRow[]>();
  if (requestIds.length === 0) return byRequest;
  const rows = await db
    .select()
    .from(upstreamTickets)
    .where(inArray(upstreamTickets.requestId, requestIds))
    .orderBy(asc(upstreamTickets.id));
  for (const t of rows) byRequest.set(t.requestId, [...(byRequest.get(t.requestId) ?? []), t]);
  return byRequest;
}

export interface ReceivedTicket {
  ticketId: string;
  requestId: string;
  /** The same ticket was received before: nothing new was stored. */
  replayed: boolean;
}

/**
 * How long a token id is remembered beyond the last moment its verifier accepts it: covers the time between a
 * verification and its commit, so the tick's pruning can never forget a token that is still being accepted.
 */
const TOKEN_MEMORY_MARGIN_MS = 10 * 60 * 1000;

/**
 * Forgets token ids whose memory ran out by `now` (the connectors tick's clock), batch by batch. A token without an
 * expiry is kept for good.
 */
export async function pruneExpiredTokens(db: Db, now: Date, opts: PruneOptions = {}): Promise<number> {
  return inBatches(db, (limit) => expiredTokensPrune(now, limit), opts);
}

/**
 * One batch of the token id prune, through webhook_tokens_expires_idx. A token id a webhook is checking right now
 * (its row locked) is left for the next tick. The plan is checked in query-plans.test.ts.
 */
export function expiredTokensPrune(now: Date, limit: number): SQL {
  return sql`
    with doomed as (
      select k.connector_id, k.token_id from ${webhookTokens} k
       where k.expires_at < ${now.toISOString()}::timestamptz
       order by k.expires_at
       limit ${limit}::int
       for update skip locked)
    delete from ${webhookTokens} k using doomed
     where k.connector_id = doomed.connector_id and k.token_id = doomed.token_id
    returning 1`;
}

export const ticketSecretContext = (ticketId: string) => `ticket:${ticketId}:secret`;

/**
 * Stores tickets from one webhook (or one polled item) and their requests in one transaction: the vendor is answered
 * only after this commits. A redelivered ticket (same connector and ticket key) changes nothing and gets the same
 * answer; copies arriving at once are serialised on a lock per ticket key. A ticket whose subject already has a
 * pending request of the same action joins that request and is reported when it finishes.
 */
export async function receiveTickets(
  deps: UpstreamDeps,
  connector: TicketConnector,
  tickets: DsrTicket[],
  verified: Verified,
  rawBody: string,
): Promise<ReceivedTicket[]> {
  const actor: Actor = { type: 'connector', id: connector.id, source: 'connector' };
  tickets.forEach(checkSubject);
  tickets = tickets.map((t) => storedKey(deps, connector, t));
  if (tickets.length === 1) {
    const fresh = await receiveFreshTicket(deps, connector, actor, tickets[0]!, verified, rawBody);
    if (fresh) return [fresh];
  }
  const created: Parameters<typeof logCreated>[2][] = [];
  const results = await deps.db.transaction(async (tx) => {
    if (connector.version !== undefined) {
      const [row] = await tx.execute<{ current: boolean }>(sql`select ${connectorIsCurrent({ id: connector.id, version: connector.version })} as current`);
      if (!row?.current) throw new StaleConnectorError();
    }
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
          connector.laterOutcome === 'when_sent_again' &&
          t.secret &&
          existing.status === 'delivered' &&
          (await toldAnOlderOutcome(tx, existing))
        ) {
          // The vendor kept the job open after our report (a failure, for Transcend an ERROR) and the request has
          // finished again since (retried): tell it the new outcome with the capability it just sent.
          await tx
            .update(upstreamTickets)
            .set({ ...resetForNewOutcome(deps.reportPolicy), lastError: null, secretSealed: deps.sealer.seal(t.secret, context) })
            .where(eq(upstreamTickets.id, existing.id));
          await enqueueReports(tx, { ticketId: existing.id });
          out.push({ ticketId: existing.id, requestId: existing.requestId, replayed: true });
          continue;
        }
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
      const result = await intakeInTx(tx, deps, actor, ticketIntake(connector, t));
      // The ticket's own request, made for another subject or action: never join a ticket to someone else's request.
      if (result.result === 'conflict') {
        throw new ApiError('conflict', 'this ticket id was already used for a different action or subject');
      }
      if (result.result === 'created') created.push(result);
      const ticket = newTicketRow(deps, connector, t, digest, result.request.id);
      await tx.insert(upstreamTickets).values(ticket);
      const ticketId = ticket.id;
      if (result.result !== 'created') await reportIfAlreadyFinished(tx, result.request.id, ticketId);
      out.push({ ticketId, requestId: result.request.id, replayed: false });
    }
    return out;
  });
  // Jobs of requests created here were added directly; a joined ticket's report may be waiting in the outbox.
  deps.outbox.kick();
  for (const c of created) logCreated(deps, actor, c);
  return results;
}

/** The connector a ticket came through; `version` when it was verified with a cached copy (WebhookConnectors). */
export interface TicketConnector {
  id: string;
  workspaceId: string;
  version?: string;
  /** Its adapter's declaration (Connector.laterOutcome): undefined when the vendor closes a ticket told of a failure. */
  laterOutcome: LaterOutcome | undefined;
}

/** The request a ticket asks for; its dedupe key is the ticket's, so a redelivery finds the same request. */
function ticketIntake(connector: { id: string; workspaceId: string }, t: DsrTicket): IntakeInput {
  return {
    workspaceId: connector.workspaceId,
    action: t.action,
    scope: 'user',
    subject: t.subject,
    upstreamRef: t.upstreamRef.slice(0, 500),
    dedupeKey: ticketDedupeKey(connector.id, t.ticketKey),
  };
}

/** Longest dedupe key stored as it is; a longer one is stored as its digest (cut short, two tickets could share one). */
const DEDUPE_KEY_MAX = 500;

function ticketDedupeKey(connectorId: string, ticketKey: string): string {
  const key = `connector:${connectorId}:${ticketKey}`;
  if (key.length <= DEDUPE_KEY_MAX) return key;
  return `connector:${connectorId}:sha256:${createHash('sha256').update(ticketKey).digest('hex')}`;
}

/**
 * The key a ticket is stored under: the vendor's, with a keyed digest of the subject for a per-subject key (the
 * digest, never the identifier, so the key holds no personal data).
 */
function storedKey(deps: UpstreamDeps, connector: { workspaceId: string }, t: DsrTicket): DsrTicket {
  if (!t.perSubject) return t;
  const digest = subjectDigest(deps.digestKey, connector.workspaceId, t.subject.kind, t.subject.value);
  return { ...t, ticketKey: `${t.ticketKey}${PER_SUBJECT_SEPARATOR}${digest.slice(0, PER_SUBJECT_DIGEST_CHARS)}` };
}

/** The key a ticket is stored under (the vendor's, with a keyed digest of the subject when per subject). */
export function storedTicketKey(deps: UpstreamDeps, connector: { workspaceId: string }, t: DsrTicket): string {
  return storedKey(deps, connector, t).ticketKey;
}

/** Shared with migration 0012, which gave the tickets stored before per-subject keys theirs. */
const PER_SUBJECT_SEPARATOR = '#';
const PER_SUBJECT_DIGEST_CHARS = 32;

/**
 * The adapter took the identifier from the vendor's body; a value intake cannot take (an email it does not accept,
 * an over-long user id) is refused here by what it is, not by intake's internal field names, and never echoed.
 */
function checkSubject(t: DsrTicket): void {
  const parsed = subjectSchema.safeParse(t.subject);
  if (parsed.success) return;
  const why = t.subject.kind === 'email' ? 'is not a valid email address' : 'is not a user id (1 to 256 characters)';
  throw new ApiError('validation_failed', `the ticket's subject ${why}`, [{ path: 'subject', message: why }]);
}

function newTicketRow(
  deps: UpstreamDeps,
  connector: { id: string; workspaceId: string },
  t: DsrTicket,
  digest: string,
  requestId: string,
): typeof upstreamTickets.$inferInsert & { id: string } {
  const id = newId('tkt');
  return {
    id,
    workspaceId: connector.workspaceId,
    connectorId: connector.id,
    ticketKey: t.ticketKey,
    requestId,
    action: t.action,
    subjectDigest: digest,
    upstreamRef: t.upstreamRef,
    upstream: t.upstream,
    secretSealed: t.secret ? deps.sealer.seal(t.secret, ticketSecretContext(id)) : null,
  };
}

function tokenRow(connectorId: string, verified: Verified, rawBody: string): typeof webhookTokens.$inferInsert {
  return {
    connectorId,
    tokenId: verified.tokenId!,
    bodyDigest: createHash('sha256').update(rawBody).digest('hex'),
    // A token that never expires is remembered for good: forgetting it would let it carry another body.
    expiresAt: verified.tokenExpiresAt ? new Date(verified.tokenExpiresAt.getTime() + TOKEN_MEMORY_MARGIN_MS) : null,
  };
}

/**
 * The common case in one statement (one round trip, committed on its own): a ticket never seen, for a subject with
 * nothing pending, with a token never seen. It inserts the token, the request, the ticket and the request's job (into
 * the job outbox: an add_job here would NOTIFY, and notifying commits cannot be grouped) with no ON CONFLICT
 * anywhere, so if anything of the kind already exists (a redelivery, a copy arriving at the same time, a pending
 * request to join, a replayed token) a unique index refuses it, the whole statement rolls back, and the answer is
 * undefined: the transaction in receiveTickets then works out what exists, exactly as it always does.
 */
async function receiveFreshTicket(
  deps: UpstreamDeps,
  connector: TicketConnector,
  actor: Actor,
  t: DsrTicket,
  verified: Verified,
  rawBody: string,
): Promise<ReceivedTicket | undefined> {
  const v = intakeInputSchema.parse(ticketIntake(connector, t));
  const request = newRequestRow(actor, v, requestDigest(deps, v));
  // The same digest as the request's: the intake schema only trims an email, which the digest does anyway.
  const ticket = newTicketRow(deps, connector, t, request.subjectDigest, request.id);
  const rows: FreshRows = {
    token: verified.tokenId ? tokenRow(connector.id, verified, rawBody) : undefined,
    request,
    ticket,
    job: executeJob(deps, request.id),
    current: connector.version === undefined ? undefined : { id: connector.id, version: connector.version },
  };
  if ((await freshWriter(deps.db).store(rows)) === 'exists') return undefined;
  deps.outbox.kick();
  logQueued(deps, actor, request);
  return { ticketId: ticket.id, requestId: request.id, replayed: false };
}

interface FreshRows {
  token: typeof webhookTokens.$inferInsert | undefined;
  request: typeof dsrRequests.$inferInsert;
  ticket: typeof upstreamTickets.$inferInsert;
  job: typeof jobOutbox.$inferInsert;
  /** The connector version the webhook was verified with, when it came from a kept copy. */
  current: { id: string; version: string } | undefined;
}

/** The columns each row sets and the optional parts: the same for every webhook today, part of the key regardless. */
function shapeOf(rows: FreshRows): string {
  return [rows.token, rows.request, rows.ticket, rows.job, rows.current]
    .map((row) => (row ? Object.keys(row).join(',') : '-'))
    .join('|');
}

/**
 * The one-statement store for a batch of tickets of one shape, built by drizzle once per shape and batch size with
 * a placeholder for every value, so a webhook only fills in values: building the statement per request cost more
 * than a fifth of the web process's CPU per webhook. The row builders set every key for every ticket, so there are
 * at most four shapes (with or without a token id, with or without the version check: webhooks through a kept
 * connector, or tickets a poll found) times six sizes (1, 2, 4 … 32).
 */
const freshStatements = new Map<string, Prebuilt<unknown>>();

function freshStatement(batch: FreshRows[]): Prebuilt<unknown> {
  const first = batch[0]!;
  const key = `${shapeOf(first)}|×${batch.length}`;
  const known = freshStatements.get(key);
  if (known) return known;
  const statement = prebuiltSql((b) => {
    const each = <T extends object>(pick: (rows: FreshRows) => T | undefined, part: string) =>
      batch.map((rows, i) => placeholders(`${i}.${part}.`, pick(rows)!));
    const requests = each((rows) => rows.request, 'r');
    // A connector verified at a version that is no longer current leaves the request without a workspace: the
    // insert fails on that NOT NULL, and nothing is stored.
    if (first.current) {
      requests.forEach((request, i) => {
        const current = connectorIsCurrent({
          id: sql.placeholder(`${i}.c.id`) as never,
          version: sql.placeholder(`${i}.c.version`) as never,
        });
        request.workspaceId = sql`case when ${current} then ${request.workspaceId} end`;
      });
    }
    const insertSql = (table: PgTable, values: Record<string, unknown>[]) => b.insert(table).values(values as never).getSQL();
    const token = first.token ? sql`tok as (${insertSql(webhookTokens, each((rows) => rows.token, 'k'))}),` : sql``;
    return sql`
      with ${token}
           req as (${insertSql(dsrRequests, requests)}),
           tkt as (${insertSql(upstreamTickets, each((rows) => rows.ticket, 't'))}),
           box as (${insertSql(jobOutbox, each((rows) => rows.job, 'j'))})
      select 1`;
  });
  freshStatements.set(key, statement);
  return statement;
}

function placeholders(prefix: string, row: object): Record<string, unknown> {
  return Object.fromEntries(Object.keys(row).map((k) => [k, sql.placeholder(prefix + k)]));
}

function placeholderValues(batch: FreshRows[]): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  batch.forEach((rows, i) => {
    const add = (part: string, row: object | undefined) => {
      for (const [k, value] of Object.entries(row ?? {})) out[`${i}.${part}.${k}`] = value;
    };
    add('k', rows.token);
    add('r', rows.request);
    add('t', rows.ticket);
    add('j', rows.job);
    add('c', rows.current);
  });
  return out;
}

/** Most fresh tickets stored by one statement. */
const FRESH_BATCH_MAX = 32;

interface FreshItem {
  rows: FreshRows;
  shape: string;
  resolve: (outcome: 'stored' | 'exists') => void;
  reject: (err: unknown) => void;
}

/**
 * Stores fresh tickets of concurrent webhooks together. At most `maxInFlight` store statements run at once; the
 * tickets that arrive meanwhile wait and go out as one statement (one round trip and one commit for all of them)
 * as soon as one finishes, so a lone webhook waits for nothing and a busy server commits in groups. Each webhook is
 * still answered only after its own ticket is committed.
 *
 * Should a batch fail on something one ticket could cause (a unique index: a redelivery or a pending request; a
 * connector that changed; a value the database cannot store) or on a deadlock with another batch, each of its
 * tickets is stored again on its own, so every ticket gets exactly the outcome it would have had alone. Any other
 * failure (the database gone) is every ticket's answer.
 */
export class FreshTicketWriter {
  private readonly waiting: FreshItem[] = [];
  private inFlight = 0;
  /** Statements sent and the most tickets one of them carried (for tests and diagnostics). */
  readonly stats = { statements: 0, largestBatch: 0 };

  constructor(
    private readonly db: Db,
    private readonly maxInFlight: number,
  ) {}

  /** 'exists' when a unique index refused the ticket; throws StaleConnectorError when its connector changed. */
  store(rows: FreshRows): Promise<'stored' | 'exists'> {
    return new Promise((resolve, reject) => {
      this.waiting.push({ rows, shape: shapeOf(rows), resolve, reject });
      this.pump();
    });
  }

  private pump(): void {
    while (this.inFlight < this.maxInFlight && this.waiting.length > 0) {
      // The oldest waiting ticket and those of its shape behind it (every webhook has the same shape today), as many
      // as the largest power of two allows: each size is its own prepared statement on every connection, so sizes
      // are kept to 1, 2, 4 … FRESH_BATCH_MAX. The rest wait for the next statement.
      const shape = this.waiting[0]!.shape;
      const same = this.waiting.filter((item) => item.shape === shape).length;
      const size = 2 ** Math.floor(Math.log2(Math.min(same, FRESH_BATCH_MAX)));
      const batch: FreshItem[] = [];
      for (let i = 0; i < this.waiting.length && batch.length < size; ) {
        if (this.waiting[i]!.shape === shape) batch.push(...this.waiting.splice(i, 1));
        else i++;
      }
      this.inFlight++;
      void this.run(batch).finally(() => {
        this.inFlight--;
        this.pump();
      });
    }
  }

  private async run(batch: FreshItem[]): Promise<void> {
    if (batch.length === 1) return settle(batch[0]!, () => this.execute([batch[0]!.rows]));
    try {
      await this.execute(batch.map((item) => item.rows));
    } catch (err) {
      // Class 23 (a unique index, the changed connector's NOT NULL), class 22 (an unstorable value) and class 40
      // (two batches deadlocked on each other's keys): each ticket on its own.
      const code = pgCode(err) ?? '';
      if (code.startsWith('23') || code.startsWith('22') || code.startsWith('40')) {
        await Promise.all(batch.map((item) => settle(item, () => this.execute([item.rows]))));
        return;
      }
      for (const item of batch) item.reject(err);
      return;
    }
    for (const item of batch) item.resolve('stored');
  }

  private async execute(batch: FreshRows[]): Promise<'stored' | 'exists'> {
    const statement = freshStatement(batch);
    this.stats.statements++;
    this.stats.largestBatch = Math.max(this.stats.largestBatch, batch.length);
    try {
      await statement.run(this.db, placeholderValues(batch));
    } catch (err) {
      if (batch.length > 1) throw err;
      if (isUniqueViolation(err)) return 'exists';
      if (pgCode(err) === '23502' && columnOf(err) === 'workspace_id') throw new StaleConnectorError();
      throw err;
    }
    return 'stored';
  }
}

async function settle(item: FreshItem, run: () => Promise<'stored' | 'exists'>): Promise<void> {
  try {
    item.resolve(await run());
  } catch (err) {
    item.reject(err);
  }
}

/**
 * Store statements running at once per process. Two keep one batch committing while the next one gathers: on the
 * 2-core benchmark machine DataGrail intake ran at ~3,000 req/s with 8, ~3,100 with 4, ~3,650 with 2 and ~3,300
 * with 1 (bench/intake.ts, 32 connections).
 */
const FRESH_IN_FLIGHT = 2;

/** One writer per database client (its pool). */
const writers = new WeakMap<object, FreshTicketWriter>();

export function freshWriter(db: Db): FreshTicketWriter {
  let writer = writers.get(db.$client);
  if (!writer) {
    writer = new FreshTicketWriter(db, FRESH_IN_FLIGHT);
    writers.set(db.$client, writer);
  }
  return writer;
}

/**
 * A signed token may only ever carry the body it was first seen with: the same message again is a harmless
 * redelivery, the same token on another body is a replay.
 */
async function rememberToken(tx: Tx, connectorId: string, verified: Verified, rawBody: string): Promise<void> {
  const row = tokenRow(connectorId, verified, rawBody);
  const bodyDigest = row.bodyDigest;
  const inserted = await tx
    .insert(webhookTokens)
    .values(row)
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
 * Whether a delivered ticket's report carried an audit record other than its request's current one: the request
 * finished again after the report (a retry of a failure). Locking the request row keeps a retry from finishing it
 * unseen meanwhile; one still running is left to the next listing or redelivery.
 */
async function toldAnOlderOutcome(tx: Tx, ticket: TicketRow): Promise<boolean> {
  if (!ticket.reportedAuditRecordId) return false;
  const [row] = await tx
    .select({ status: dsrRequests.status, auditRecordId: dsrRequests.auditRecordId })
    .from(dsrRequests)
    .where(eq(dsrRequests.id, ticket.requestId))
    .for('share');
  return (
    !!row?.auditRecordId &&
    (row.status === 'complete' || row.status === 'failed') &&
    row.auditRecordId !== ticket.reportedAuditRecordId
  );
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
 * What sets a ticket back to pending to report a new outcome (a retry of its request, a redelivery), with a fresh
 * attempt budget. Its generation moves on, so an attempt already in flight (it read the ticket before) records
 * nothing when it ends. Its vendor call may still land, though: if the ticket was pending and due, a report of the old
 * outcome may be on its way right now, so the new one is held until that attempt is surely over (next_attempt_at,
 * `attemptTimeoutMs` and a second after the reset; the first attempt waits for it): the vendor hears the new outcome
 * last. A ticket still held by an earlier reset keeps that hold (what it waits for may still be on its way). A ticket
 * that had failed, or whose next attempt was still ahead, has nothing on its way and is not held.
 */
export function resetForNewOutcome(policy: Pick<UpstreamDeps['reportPolicy'], 'attemptTimeoutMs'>) {
  const t = upstreamTickets;
  return {
    status: 'pending' as const,
    attempts: 0,
    generation: sql`${t.generation} + 1`,
    nextAttemptAt: sql`case when ${t.status} = 'pending' and (${t.nextAttemptAt} is null or ${t.nextAttemptAt} <= now())
      then clock_timestamp() + make_interval(secs => ${(policy.attemptTimeoutMs + 1000) / 1000}::float8)
      when ${t.status} = 'pending' and ${t.attempts} = 0 then ${t.nextAttemptAt} end`,
    updatedAt: sql`now()`,
  };
}

/** Vendors whose tickets told of a failure are told the outcome of a retry at once (Connector.laterOutcome). */
const laterOutcomeAtOnce = Object.values(CONNECTORS)
  .filter((c) => c.laterOutcome === 'at_once')
  .map((c) => c.vendor);

/**
 * Sets a retried request's tickets back to pending to report its new outcome (resetForNewOutcome): those still
 * waiting or whose delivery failed, and those already told of the failure whose vendor takes a later outcome at
 * once (`at_once`), unless their connector was deleted (its secrets are gone). A ticket told of the failure keeps
 * `deliveredAt` and `reportedAuditRecordId` until the new outcome is delivered, so the view still shows what the
 * vendor heard. Other tickets told of the failure are left alone (`when_sent_again`: see receiveTickets).
 */
export async function resetTicketsForRetry(tx: Tx, policy: Pick<UpstreamDeps['reportPolicy'], 'attemptTimeoutMs'>, requestId: string): Promise<void> {
  const t = upstreamTickets;
  const toldCanHear = and(
    eq(t.status, 'delivered'),
    inArray(
      t.connectorId,
      tx
        .select({ id: connectors.id })
        .from(connectors)
        .where(and(inArray(connectors.vendor, laterOutcomeAtOnce), isNull(connectors.deletedAt))),
    ),
  );
  await tx
    .update(t)
    .set({ ...resetForNewOutcome(policy), lastError: null })
    .where(and(eq(t.requestId, requestId), or(inArray(t.status, ['pending', 'failed']), toldCanHear)));
}

/**
 * Adds the next report_upstream job of every pending ticket of a request (or of one ticket), through the job outbox:
 * kick deps.outbox after the commit. Job keys carry the attempt number, so enqueueing twice is harmless and each
 * retry is a job of its own.
 */
export async function enqueueReports(tx: DbOrTx, which: { requestId: string } | { ticketId: string }): Promise<number[]> {
  return addReportJobs(tx, 'requestId' in which ? reportJobsOf.request : reportJobsOf.ticket, which);
}

/**
 * Safety net run by the cron tick: a ticket of a finished request still pending long after its next attempt was due
 * has lost its job (e.g. the job itself failed on every try while the database was down). Adding it again under the
 * same key revives a failed job; a delivered or failed ticket is never touched.
 */
export async function requeueStalledReports(db: DbOrTx, stalledForMinutes: number): Promise<number> {
  const added = await addReportJobs(db, reportJobsOf.stalled, { stalledForMinutes });
  return added.length;
}

/**
 * Report jobs go through the job outbox (kick it after the commit): an add_job would NOTIFY, and the commits of
 * notifying transactions are serialised, which would put every erasure's commit in one line.
 */
const reportJobsWhere = (cond: SQL) =>
  prebuiltSql<{ id: number }>(
    () => sql`
    insert into ${jobOutbox} (task, payload, job_key, max_attempts, priority)
    select 'report_upstream', jsonb_build_object('ticketId', t.id, 'attempt', t.attempts + 1),
           'report:' || t.id || ':' || (t.attempts + 1), 3,
           -- Ahead of queued erasures: the work is done, only the proof is waiting to go out.
           -1
    from ${upstreamTickets} t
    where t.status = 'pending' and ${cond}
    returning id`,
  );

const reportJobsOf = {
  request: reportJobsWhere(sql`t.request_id = ${p('requestId')}`),
  ticket: reportJobsWhere(sql`t.id = ${p('ticketId')}`),
  stalled: reportJobsWhere(
    // A retry is due since its next attempt. A first attempt is due since the latest of: when the request finished,
    // when the ticket was last put back to pending (a redelivery or a retry), and the end of its hold if it was held
    // (next_attempt_at): a retried request that sat in the queue past its hold has its report just queued, not lost.
    sql`exists (select 1 from ${dsrRequests} r where r.id = t.request_id and r.status in ('complete', 'failed')
              and case when t.attempts > 0 then coalesce(t.next_attempt_at, t.updated_at)
                       else greatest(t.next_attempt_at, r.finished_at, t.updated_at) end
                  < now() - make_interval(mins => ${p('stalledForMinutes')}::int))`,
  ),
};

/** Returns the outbox rows' ids (reportNow can deliver them right after the commit). */
async function addReportJobs(db: DbOrTx, statement: Prebuilt<postgres.RowList<{ id: number }[]>>, values: Record<string, unknown>): Promise<number[]> {
  const rows = await statement.run(db, values);
  return rows.map((r) => Number(r.id));
}
