import { and, eq, inArray, isNull, sql, type SQL } from 'drizzle-orm';
import type { Tx } from '../db/client.ts';
import { lockKeys } from '../db/locks.ts';
import {
  conversations,
  dsrRequests,
  endUsers,
  erasureMarkers,
  events,
  legalHolds,
  messages,
  suppressions,
  topicQuestions,
  workspaces,
  type AuditCounts,
  type HoldCounts,
  type Outcome,
} from '../db/schema/index.ts';
import { emailLockKey, normalizeEmail, subjectDigest, userLockKey, workspaceLockKey } from '../lib/digest.ts';
import { errorCodeOf, isTransient } from '../db/errors.ts';
import { DomainError } from '../lib/errors.ts';
import type { PrivacyDeps } from './context.ts';
import { isHoldAction, type DsrRequest } from './intake.ts';
import { appendAudit, auditFinishedAt, type AuditRecord } from './audit-chain.ts';
import { countHolds, heldDigests } from './holds.ts';
import { newId } from '../lib/ids.ts';
import { clientOf, commitWithoutFlush, p, prebuilt, prebuiltSql } from '../db/prebuilt.ts';
import { enqueueReports } from '../upstream/tickets.ts';

export type { AuditRecord };

export interface ExecuteOptions {
  /** graphile-worker's attempt number for this run (1-based) and the job's limit. */
  attempt: number;
  maxAttempts: number;
}

/** What running a request reads of its row (returned by the statement that marks it running). */
const runningColumns = {
  id: dsrRequests.id,
  workspaceId: dsrRequests.workspaceId,
  action: dsrRequests.action,
  scope: dsrRequests.scope,
  subjectKind: dsrRequests.subjectKind,
  subjectValue: dsrRequests.subjectValue,
  subjectDigest: dsrRequests.subjectDigest,
  actorType: dsrRequests.actorType,
  actorId: dsrRequests.actorId,
  upstreamRef: dsrRequests.upstreamRef,
  startedAt: dsrRequests.startedAt,
};
type RunningRequest = Pick<DsrRequest, keyof typeof runningColumns>;

/** The finished request's outcome columns. */
const finishedColumns = {
  id: dsrRequests.id,
  status: dsrRequests.status,
  outcome: dsrRequests.outcome,
  errorCode: dsrRequests.errorCode,
  auditRecordId: dsrRequests.auditRecordId,
  finishedAt: dsrRequests.finishedAt,
};
export type FinishedRequest = Pick<DsrRequest, keyof typeof finishedColumns>;

// The statements every request runs, built once (see prebuilt.ts). Arrays travel as one parameter each.
const markRunning = prebuilt((b) =>
  b
    .update(dsrRequests)
    .set({
      status: 'running',
      startedAt: sql`coalesce(${dsrRequests.startedAt}, now())`,
      attempts: sql`${dsrRequests.attempts} + 1`,
      updatedAt: sql`now()`,
    })
    // Not flushed on its own: should the database crash before the erasure commits, the job runs again and marks
    // the request afresh (its attempt count may then be one short); the erasure's commit makes it durable.
    .where(and(eq(dsrRequests.id, p('id')), inArray(dsrRequests.status, ['queued', 'running']), commitWithoutFlush))
    .returning(runningColumns),
);

const markFinished = prebuilt((b) =>
  b
    .update(dsrRequests)
    .set({
      status: p('status') as never,
      outcome: p('outcome') as never,
      errorCode: p('errorCode') as never,
      auditRecordId: p('auditRecordId') as never,
      resolvedDigests: sql`${p('resolvedDigests')}::text[]`,
      subjectValue: null,
      subjectSealed: p('subjectSealed') as never,
      finishedAt: p('finishedAt') as never,
      updatedAt: sql`now()`,
    })
    // Only a pending request: one finished already (say its erasure committed but the acknowledgement was lost, and
    // this is the failure path) keeps its outcome and its one audit record.
    .where(and(eq(dsrRequests.id, p('id')), inArray(dsrRequests.status, ['queued', 'running'])))
    .returning(finishedColumns),
);

const findUser = {
  user_id: prebuilt((b) =>
    b
      .select({ id: endUsers.id, externalId: endUsers.externalId, email: endUsers.emailNormalized })
      .from(endUsers)
      .where(and(eq(endUsers.workspaceId, p('workspaceId')), eq(endUsers.externalId, p('value')))),
  ),
  email: prebuilt((b) =>
    b
      .select({ id: endUsers.id, externalId: endUsers.externalId, email: endUsers.emailNormalized })
      .from(endUsers)
      .where(and(eq(endUsers.workspaceId, p('workspaceId')), eq(endUsers.emailNormalized, p('value')))),
  ),
};

/** `= any(…)` over the profile ids being erased (one array parameter, whatever their number). */
const anyOfIds = sql`any(${p('ids')}::bigint[])`;
const eraseStatements = {
  messages: prebuilt((b) => b.delete(messages).where(sql`${messages.userId} = ${anyOfIds}`)),
  conversations: prebuilt((b) => b.delete(conversations).where(sql`${conversations.userId} = ${anyOfIds}`)),
  events: prebuilt((b) => b.delete(events).where(sql`${events.userId} = ${anyOfIds}`)),
  topicQuestions: prebuilt((b) => b.delete(topicQuestions).where(sql`${topicQuestions.userId} = ${anyOfIds}`)),
  suppressions: prebuilt((b) => b.delete(suppressions).where(sql`${suppressions.userId} = ${anyOfIds}`)),
  profiles: prebuilt((b) => b.delete(endUsers).where(sql`${endUsers.id} = ${anyOfIds}`)),
};

/** Runs after the deletes: anything of the subjects still there (a profile re-created under the id included). */
const remainingAfterErase = prebuiltSql<{ remaining: number }>(
  () => sql`
    select (
      (select count(*) from ${endUsers} where ${endUsers.workspaceId} = ${p('workspaceId')}
         and (${endUsers.id} = ${anyOfIds} or ${endUsers.externalId} = any(${p('externalIds')}::text[])))
      + (select count(*) from ${messages} where ${messages.userId} = ${anyOfIds})
      + (select count(*) from ${conversations} where ${conversations.userId} = ${anyOfIds})
      + (select count(*) from ${topicQuestions} where ${topicQuestions.userId} = ${anyOfIds})
      + (select count(*) from ${suppressions} where ${suppressions.userId} = ${anyOfIds})
    )::int as remaining`,
);

/**
 * One batch of the prune of erasure markers (maintenance tick): a marker only matters to an ingest that read the
 * erasure state before the erasure committed and reads it again right after (src/product/ingest.ts), so one a day old
 * is of no use; it goes. The plan is checked in query-plans.test.ts.
 */
export function oldErasureMarkersPrune(limit: number): SQL {
  return sql`
    with doomed as (
      select m.workspace_id, m.user_digest from ${erasureMarkers} m
       where m.erased_at < now() - interval '1 day'
       order by m.erased_at
       limit ${limit}::int
       for update skip locked)
    delete from ${erasureMarkers} m using doomed
     where m.workspace_id = doomed.workspace_id and m.user_digest = doomed.user_digest
    returning 1`;
}

const markErased = prebuiltSql(
  () => sql`
    insert into ${erasureMarkers} (workspace_id, user_digest, erased_at)
    select ${p('workspaceId')}, digest, clock_timestamp() from unnest(${p('digests')}::text[]) as digest
    on conflict (workspace_id, user_digest) do update set erased_at = excluded.erased_at`,
);

/**
 * `reports`: the job-outbox rows of the request's report jobs, committed with it; the caller delivers them at once
 * (reportNow) or lets the outbox hand them to graphile-worker (kick).
 */
export type ExecuteResult =
  | { kind: 'skipped'; reason: 'missing' | 'terminal' }
  | { kind: 'complete'; request: FinishedRequest; audit: AuditRecord; reports: number[] }
  | { kind: 'failed'; request: FinishedRequest; audit: AuditRecord; reports: number[]; errorCode: string };

/** The request was finished by someone else meanwhile: the transaction rolls back and nothing is recorded twice. */
class AlreadyFinished extends Error {
  constructor() {
    super('request already finished');
    this.name = 'AlreadyFinished';
  }
}

export class TransientFailure extends Error {
  constructor(readonly code: string) {
    super(`transient failure (${code}); will retry`);
    this.name = 'TransientFailure';
  }
}

interface Applied {
  outcome: Outcome;
  counts: AuditCounts & HoldCounts;
}

/**
 * Runs one request: resolve the subject, apply the action, write the audit record and complete the request, all in
 * one transaction. A failure rolls the data back completely; a transient one is rethrown for graphile-worker to
 * retry while attempts remain, anything else is recorded as a failed request with a failed audit record.
 */
export async function executeRequest(
  ctx: PrivacyDeps,
  requestId: string,
  opts: ExecuteOptions,
): Promise<ExecuteResult> {
  const [running] = await markRunning.run(ctx.db, { id: requestId });
  if (!running) {
    const [exists] = await ctx.db.select({ id: dsrRequests.id }).from(dsrRequests).where(eq(dsrRequests.id, requestId));
    return { kind: 'skipped', reason: exists ? 'terminal' : 'missing' };
  }
  const log = ctx.logger.child({ requestId, action: running.action, scope: running.scope });
  const startedAt = running.startedAt ?? new Date();
  // Set by the resolution; a request that then fails (a legal hold) still records whom it was about.
  const resolved: Resolution = { digests: null };

  try {
    const done = await ctx.db.transaction(async (tx) => {
      const applied = await apply(tx, ctx, running, resolved);
      return finish(tx, ctx, running, startedAt, { status: 'complete', ...applied, errorCode: null }, resolved.digests);
    });
    log.info({ outcome: done.audit.outcome, auditRecordId: done.audit.id, counts: done.audit.counts }, 'request complete');
    return { kind: 'complete', ...done };
  } catch (err) {
    if (err instanceof AlreadyFinished) return { kind: 'skipped', reason: 'terminal' };
    const errorCode = errorCodeOf(err);
    if (isTransient(err) && opts.attempt < opts.maxAttempts) {
      log.warn({ errorCode, attempt: opts.attempt }, 'transient failure; will retry');
      // graphile-worker logs and stores the thrown message: give it our code, not the database's wording.
      throw new TransientFailure(errorCode);
    }
    log.error({ errorCode, attempt: opts.attempt }, 'request failed');
    return recordFailure(ctx, running, startedAt, errorCode, resolved.digests);
  }
}

async function recordFailure(
  ctx: PrivacyDeps,
  req: RunningRequest,
  startedAt: Date,
  errorCode: string,
  resolvedDigests: string[] | null,
): Promise<Extract<ExecuteResult, { kind: 'failed' | 'skipped' }>> {
  try {
    const done = await ctx.db.transaction((tx) =>
      finish(tx, ctx, req, startedAt, { status: 'failed', outcome: 'failed', counts: {}, errorCode }, resolvedDigests),
    );
    return { kind: 'failed', ...done, errorCode };
  } catch (err) {
    if (err instanceof AlreadyFinished) return { kind: 'skipped', reason: 'terminal' };
    throw err;
  }
}

/**
 * Pending requests whose execute_request job has used up its attempts without finishing them (not locked, and
 * graphile-worker will not run it again): its workers died mid-run (each crash costs an attempt), or the last
 * attempt could not even record a failure (database unreachable).
 */
const abandonedRequests = prebuiltSql<{ id: string }>(
  // From the jobs (few: done ones are deleted) to their requests by primary key, never a scan of all requests.
  () => sql`
    select r.id from graphile_worker._private_jobs j
      join ${dsrRequests} r on r.id = j.key
     where j.locked_by is null and j.attempts >= j.max_attempts and r.status in ('queued', 'running')
     limit 100`,
);

/** The same, for one request, with the job row locked (taken after the request's row, as retry takes them). */
const abandonedJobLocked = prebuiltSql<{ id: string }>(
  () => sql`
    select j.key as id from graphile_worker._private_jobs j
     where j.key = ${p('id')} and j.locked_by is null and j.attempts >= j.max_attempts
       for update`,
);

const lockPendingRequest = prebuilt((b) =>
  b
    .select(runningColumns)
    .from(dsrRequests)
    .where(and(eq(dsrRequests.id, p('id')), inArray(dsrRequests.status, ['queued', 'running'])))
    .for('update'),
);

/** errorCode of a request whose job gave up without finishing it. */
export const ATTEMPTS_EXHAUSTED = 'attempts_exhausted';

/**
 * Finishes abandoned requests as failed (errorCode `attempts_exhausted`), each with its failed audit record and its
 * vendor reports, so none stays pending for good, holding every later request for its subject as a duplicate; a
 * failed request can be retried. Run by the minute tick. Returns the failed requests' report outbox rows.
 */
export async function failAbandonedRequests(ctx: PrivacyDeps): Promise<{ failed: string[]; reports: number[] }> {
  const out = { failed: [] as string[], reports: [] as number[] };
  for (const { id } of await abandonedRequests.run(ctx.db)) {
    const done = await ctx.db.transaction(async (tx) => {
      const [req] = await lockPendingRequest.run(tx, { id });
      if (!req) return undefined;
      const [job] = await abandonedJobLocked.run(tx, { id });
      if (!job) return undefined;
      // Nothing was resolved: no run got that far, or its transaction rolled back with it.
      const failed = { status: 'failed', outcome: 'failed', counts: {}, errorCode: ATTEMPTS_EXHAUSTED } as const;
      return finish(tx, ctx, req, req.startedAt ?? new Date(), failed, null);
    });
    if (!done) continue;
    ctx.logger.error({ requestId: id, errorCode: ATTEMPTS_EXHAUSTED, auditRecordId: done.audit.id }, 'request failed: its job ran out of attempts');
    out.failed.push(id);
    out.reports.push(...done.reports);
  }
  return out;
}

async function finish(
  tx: Tx,
  ctx: PrivacyDeps,
  req: RunningRequest,
  startedAt: Date,
  result: Applied & { status: 'complete' | 'failed'; errorCode: string | null },
  resolvedDigests: string[] | null,
): Promise<{ request: FinishedRequest; audit: AuditRecord; reports: number[] }> {
  // One round trip for the request row, its reports and the chain lock with the chain's head (sent in this order,
  // so the workspace's chain lock is taken last and held only for the append and the commit).
  const auditId = newId('aud');
  const finishedAt = auditFinishedAt(startedAt);
  const updating = markFinished.run(tx, {
    id: req.id,
    status: result.status,
    outcome: result.outcome,
    errorCode: result.errorCode,
    auditRecordId: auditId,
    resolvedDigests: resolvedDigests && clientOf(tx).array(resolvedDigests),
    subjectSealed:
      result.status === 'failed' && req.subjectValue !== null
        ? ctx.sealer.seal(req.subjectValue, subjectSealContext(req.id))
        : null,
    finishedAt,
  }); // sent now, ahead of the statements below
  const reporting = enqueueReports(tx, { requestId: req.id });
  const auditing = appendAudit(tx, {
    id: auditId,
    finishedAt,
    workspaceId: req.workspaceId,
    requestId: req.id,
    action: req.action,
    scope: req.scope,
    subjectKind: req.subjectKind,
    subjectDigest: req.subjectDigest,
    actorType: req.actorType,
    actorId: req.actorId,
    upstreamRef: req.upstreamRef,
    status: result.status,
    outcome: result.outcome,
    counts: result.counts,
    errorCode: result.errorCode,
    startedAt,
  });
  const [[request], reports, audit] = await Promise.all([updating, reporting, auditing]);
  if (!request) throw new AlreadyFinished();
  return { request, audit, reports };
}

/** Where a failed request's sealed identifier is bound: it opens only on its own row. */
export const subjectSealContext = (requestId: string) => `dsr_requests:${requestId}:subject`;

/** The digests of the identifiers a request's subject resolved to (null: nobody, or not resolved). */
interface Resolution {
  digests: string[] | null;
}

async function apply(tx: Tx, ctx: PrivacyDeps, req: RunningRequest, resolved: Resolution): Promise<Applied> {
  if (req.scope === 'workspace') {
    await lockKeys(tx, 'exclusive', [workspaceLockKey(req.workspaceId)]);
    switch (req.action) {
      case 'erase':
        // Holds are placed under the workspace's shared lock, which this exclusive one waits out.
        await refuseIfHeld(tx, req.workspaceId, null);
        return eraseWorkspace(tx, req.workspaceId);
      case 'suppress':
      case 'unsuppress':
        return setSuppression(tx, req.workspaceId, null, req);
      case 'hold':
      case 'release_hold':
        throw new DomainError('scope_not_supported', 'a legal hold is placed on a user, not a workspace');
    }
  }
  const users = await resolveAndLock(tx, req);
  const digests = heldDigests(ctx.digestKey, req.workspaceId, users);
  resolved.digests = digests.length ? digests : null;
  if (isHoldAction(req.action)) return setHold(tx, ctx, req, users);
  if (req.action === 'erase') {
    // Under the locks a hold on any of these profiles is placed under, so one committed before this check is seen,
    // and one placed after it waits until this erasure has committed.
    await refuseIfHeld(tx, req.workspaceId, [req.subjectDigest, ...digests]);
  }
  if (users.length === 0) return { outcome: 'not_found', counts: {} };
  switch (req.action) {
    case 'erase':
      // By email, the email is marked erased too: an identify that waited for this erasure to link a profile to it
      // is dropped (src/product/ingest.ts).
      return eraseUsers(tx, ctx, req.workspaceId, users, req.subjectKind === 'email' ? [req.subjectDigest] : []);
    case 'suppress':
    case 'unsuppress':
      return setSuppression(tx, req.workspaceId, users, req);
  }
}

interface ResolvedUser {
  id: number;
  externalId: string;
  /** Normalised. */
  email: string | null;
}

/**
 * Takes the workspace's shared lock (and an email's exclusive one), finds the subject's profiles (an email may match
 * several) and takes their exclusive locks before acting. Each lookup is sent together with the locks it must come
 * after (run in order, a snapshot per statement), so the common case is one round trip.
 */
async function resolveAndLock(tx: Tx, req: RunningRequest): Promise<ResolvedUser[]> {
  if (req.subjectValue === null) throw new DomainError('subject_missing', 'request has no subject identifier');
  const value = req.subjectValue;
  const lookup = {
    workspaceId: req.workspaceId,
    value: req.subjectKind === 'email' ? normalizeEmail(value) : value,
  };
  const find = () => findUser[req.subjectKind === 'email' ? 'email' : 'user_id'].run(tx, lookup);
  const locked = new Set<string>();
  // lockKeys sends its statement when called, so each batch's locks go out ahead of the lookup awaited with them.
  const locks = [lockKeys(tx, 'shared', [workspaceLockKey(req.workspaceId)])];
  // An external id is known up front; an email is resolved first, then re-resolved under the locks. The email's own
  // key waits out an ingest that is linking a profile to the email, so the lookup sees that profile.
  if (req.subjectKind === 'user_id') {
    locks.push(lockKeys(tx, 'exclusive', [userLockKey(req.workspaceId, value)]));
    locked.add(value);
  } else {
    locks.push(lockKeys(tx, 'exclusive', [emailLockKey(req.workspaceId, value)]));
  }
  let [users] = await Promise.all([find(), ...locks]);
  for (let round = 1; round < 5; round++) {
    const missing = users.filter((u) => !locked.has(u.externalId));
    if (missing.length === 0) return users;
    const locking = lockKeys(
      tx,
      'exclusive',
      missing.map((u) => userLockKey(req.workspaceId, u.externalId)),
    );
    for (const u of missing) locked.add(u.externalId);
    [users] = await Promise.all([find(), locking]);
  }
  if (users.every((u) => locked.has(u.externalId))) return users;
  throw new DomainError('subject_unstable', 'subject profiles kept changing during resolution');
}

async function eraseUsers(
  tx: Tx,
  ctx: PrivacyDeps,
  workspaceId: string,
  users: ResolvedUser[],
  subjectDigests: string[],
): Promise<Applied> {
  const ids = users.map((u) => u.id);
  const externalIds = users.map((u) => u.externalId);
  // Sent together and run in this order on the transaction's connection (one round trip instead of eight); the
  // check that nothing remains runs after the deletes, and a failure of any statement (or that check) rolls all of
  // them back, the erasure markers included.
  const client = clientOf(tx);
  const values = {
    workspaceId,
    ids: client.array(ids, 20),
    externalIds: client.array(externalIds),
    digests: client.array([
      ...externalIds.map((ext) => subjectDigest(ctx.digestKey, workspaceId, 'user_id', ext)),
      ...subjectDigests,
    ]),
  };
  const [m, c, e, q, s, profiles, left] = await Promise.all([
    eraseStatements.messages.run(tx, values),
    eraseStatements.conversations.run(tx, values),
    eraseStatements.events.run(tx, values),
    eraseStatements.topicQuestions.run(tx, values),
    eraseStatements.suppressions.run(tx, values),
    eraseStatements.profiles.run(tx, values),
    remainingAfterErase.run(tx, values),
    markErased.run(tx, values),
  ]);
  const counts: AuditCounts = {
    messages: m.count,
    conversations: c.count,
    events: e.count,
    topicQuestions: q.count,
    suppressions: s.count,
    profiles: profiles.count,
  };
  if (left[0]?.remaining !== 0) {
    throw new DomainError('erasure_verification_failed', 'data of the subject remained after erasure');
  }
  return { outcome: 'erased', counts };
}

async function eraseWorkspace(tx: Tx, workspaceId: string): Promise<Applied> {
  const counts: AuditCounts = {
    messages: (await tx.delete(messages).where(eq(messages.workspaceId, workspaceId))).count,
    conversations: (await tx.delete(conversations).where(eq(conversations.workspaceId, workspaceId))).count,
    events: (await tx.delete(events).where(eq(events.workspaceId, workspaceId))).count,
    topicQuestions: (await tx.delete(topicQuestions).where(eq(topicQuestions.workspaceId, workspaceId))).count,
    suppressions: (await tx.delete(suppressions).where(eq(suppressions.workspaceId, workspaceId))).count,
    profiles: (await tx.delete(endUsers).where(eq(endUsers.workspaceId, workspaceId))).count,
  };
  await tx.delete(erasureMarkers).where(eq(erasureMarkers.workspaceId, workspaceId));
  const [left] = await tx.execute<{ remaining: number }>(sql`
    select (
      (select count(*) from ${endUsers} where ${endUsers.workspaceId} = ${workspaceId})
      + (select count(*) from ${events} where ${events.workspaceId} = ${workspaceId})
      + (select count(*) from ${messages} where ${messages.workspaceId} = ${workspaceId})
      + (select count(*) from ${conversations} where ${conversations.workspaceId} = ${workspaceId})
      + (select count(*) from ${topicQuestions} where ${topicQuestions.workspaceId} = ${workspaceId})
      + (select count(*) from ${suppressions} where ${suppressions.workspaceId} = ${workspaceId})
    )::int as remaining`);
  if (!left || left.remaining !== 0) {
    throw new DomainError('erasure_verification_failed', 'workspace data remained after erasure');
  }
  // The row stays as a tombstone so audit records keep their link.
  await tx.update(workspaces).set({ erasedAt: sql`clock_timestamp()` }).where(eq(workspaces.id, workspaceId));
  return { outcome: 'erased', counts };
}

/**
 * A request of the same pair (suppress/unsuppress, hold/release_hold) for the same subject, made after this one and
 * already applied: the subject's flag (or hold) says what the newest request asked, whatever order the jobs ran in. "After" is by the database's clock (created_at, then id
 * for requests made in one transaction): an id carries the clock of the process that made it, which may be behind
 * another web process's. Both hold the subject's exclusive locks while they run, so the other's outcome is committed
 * before this one looks.
 */
const newerOfPairApplied = prebuiltSql<{ newer: boolean }>(
  () => sql`
    select exists (
      select 1 from ${dsrRequests}
       where ${dsrRequests.workspaceId} = ${p('workspaceId')} and ${dsrRequests.scope} = ${p('scope')}
         and ${dsrRequests.subjectDigest} = ${p('subjectDigest')} and ${dsrRequests.status} = 'complete'
         and ${dsrRequests.action} in (${p('action')}, ${p('opposite')})
         and (${dsrRequests.createdAt}, ${dsrRequests.id}) >
             (select r.created_at, r.id from ${dsrRequests} r where r.id = ${p('id')})) as newer`,
);

async function setSuppression(
  tx: Tx,
  workspaceId: string,
  users: ResolvedUser[] | null,
  req: RunningRequest,
): Promise<Applied> {
  if (await supersededByNewer(tx, req, 'suppress', 'unsuppress')) {
    // Changes nothing (the counts say so): undoing a newer request's effect would turn the subject's flag back.
    return { outcome: req.action === 'suppress' ? 'suppressed' : 'unsuppressed', counts: { suppressions: 0 } };
  }
  if (req.action === 'suppress') {
    const rows = users
      ? users.map((u) => ({ workspaceId, userId: u.id, requestId: req.id }))
      : [{ workspaceId, userId: null, requestId: req.id }];
    const added = await tx.insert(suppressions).values(rows).onConflictDoNothing();
    return { outcome: 'suppressed', counts: { suppressions: added.count } };
  }
  const where = users
    ? and(eq(suppressions.workspaceId, workspaceId), inArray(suppressions.userId, users.map((u) => u.id)))
    : and(eq(suppressions.workspaceId, workspaceId), isNull(suppressions.userId));
  const removed = await tx.delete(suppressions).where(where);
  return { outcome: 'unsuppressed', counts: { suppressions: removed.count } };
}

async function supersededByNewer(tx: Tx, req: RunningRequest, action: string, opposite: string): Promise<boolean> {
  const [row] = await newerOfPairApplied.run(tx, {
    workspaceId: req.workspaceId,
    scope: req.scope,
    subjectDigest: req.subjectDigest,
    id: req.id,
    action,
    opposite,
  });
  return row?.newer === true;
}

/**
 * Places or releases the hold on the request's identifier (whether or not a profile carries it yet), under the same
 * locks as an erasure of it: the newest of a hold and a release wins, as for suppressions. A release lifts only the
 * hold placed with its own identifier (a hold placed by email is a decision about that email, and another hold may
 * name the same person for another matter); it counts the holds still in force that would refuse an erasure by that
 * identifier, so the caller learns that the person is still held.
 */
async function setHold(tx: Tx, ctx: PrivacyDeps, req: RunningRequest, users: ResolvedUser[]): Promise<Applied> {
  const hold = req.action === 'hold';
  const outcome = hold ? 'held' : 'released';
  const superseded = await supersededByNewer(tx, req, 'hold', 'release_hold');
  const changed = superseded
    ? 0
    : hold
      ? (
          await tx
            .insert(legalHolds)
            .values({ workspaceId: req.workspaceId, subjectDigest: req.subjectDigest, requestId: req.id })
            .onConflictDoNothing()
        ).count
      : (
          await tx
            .delete(legalHolds)
            .where(and(eq(legalHolds.workspaceId, req.workspaceId), eq(legalHolds.subjectDigest, req.subjectDigest)))
        ).count;
  if (hold) return { outcome, counts: { holds: changed } };
  const covering = [req.subjectDigest, ...heldDigests(ctx.digestKey, req.workspaceId, users)];
  return { outcome, counts: { holds: changed, holdsInForce: await countHolds(tx, req.workspaceId, covering) } };
}

/** errorCode of an erasure refused because its subject (or, for a workspace, anyone in it) is on legal hold. */
export const LEGAL_HOLD = 'legal_hold';

/**
 * Any of these digests held (null: any hold in the workspace), or about to be: a hold request still queued or running
 * that no later release of the same identifier supersedes. Jobs run in no set order (several workers, a retried job),
 * so an erasure asked for after a hold, or in the same batch, may run before the hold is applied; it must not erase
 * that person meanwhile.
 */
const anyHeld = prebuiltSql<{ held: boolean }>(
  () => sql`
    select exists (
      select 1 from ${legalHolds}
       where ${legalHolds.workspaceId} = ${p('workspaceId')}
         and (${p('digests')}::text[] is null or ${legalHolds.subjectDigest} = any(${p('digests')}::text[])))
    or exists (
      select 1 from ${dsrRequests} h
       where h.workspace_id = ${p('workspaceId')} and h.action = 'hold' and h.scope = 'user'
         and h.status in ('queued', 'running')
         and (${p('digests')}::text[] is null or h.subject_digest = any(${p('digests')}::text[]))
         and not exists (
           select 1 from ${dsrRequests} r
            where r.workspace_id = h.workspace_id and r.subject_digest = h.subject_digest
              and r.action = 'release_hold' and r.scope = 'user' and r.status <> 'failed'
              and (r.created_at, r.id) > (h.created_at, h.id))) as held`,
);

async function refuseIfHeld(tx: Tx, workspaceId: string, digests: string[] | null): Promise<void> {
  const [row] = await anyHeld.run(tx, { workspaceId, digests: digests && clientOf(tx).array(digests) });
  if (row?.held) throw new DomainError(LEGAL_HOLD, 'the subject is on legal hold; nothing was erased');
}
