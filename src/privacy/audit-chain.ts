import { createHash } from 'node:crypto';
import { and, asc, eq, getTableColumns, gt, isNotNull, isNull, sql } from 'drizzle-orm';
import type { Db, Tx } from '../db/client.ts';
import { lockKeys } from '../db/locks.ts';
import { auditRecords, dsrRequests, workspaces } from '../db/schema/index.ts';
import { lockKey } from '../lib/digest.ts';
import { newId } from '../lib/ids.ts';
import { p, prebuiltSql } from '../db/prebuilt.ts';

export type AuditRecord = typeof auditRecords.$inferSelect;
export type NewAuditRecord = Omit<
  typeof auditRecords.$inferInsert,
  'id' | 'chainSeq' | 'prevHash' | 'hash' | 'recordedAt' | 'finishedAt'
> & {
  startedAt: Date;
  /** Chosen by a caller that must name the record before appending it (e.g. on its request row). */
  id?: string;
  /** Likewise; by default now, never before startedAt (auditFinishedAt). */
  finishedAt?: Date;
};

export const CHAIN_ALGORITHM = 'sha256';

/** The fields a record's hash covers, in the order and form the canonical serialisation uses. */
type Hashed = Pick<
  AuditRecord,
  | 'id'
  | 'workspaceId'
  | 'chainSeq'
  | 'prevHash'
  | 'requestId'
  | 'action'
  | 'scope'
  | 'subjectKind'
  | 'subjectDigest'
  | 'actorType'
  | 'actorId'
  | 'upstreamRef'
  | 'status'
  | 'outcome'
  | 'counts'
  | 'errorCode'
  | 'startedAt'
  | 'finishedAt'
  | 'recordedAt'
>;

/**
 * Canonical serialisation (version 1): a JSON object with keys sorted by code point, no whitespace, timestamps as
 * ISO-8601 UTC with milliseconds, absent values as null. Anyone holding a record can rebuild it and check the hash
 * with any sha256 tool; README documents it.
 */
export function canonicalAudit(r: Hashed): string {
  const counts = Object.fromEntries(
    Object.entries(r.counts ?? {})
      .filter(([, v]) => v !== undefined)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)),
  );
  const fields: Record<string, unknown> = {
    action: r.action,
    actorId: r.actorId ?? null,
    actorType: r.actorType,
    counts,
    errorCode: r.errorCode ?? null,
    finishedAt: r.finishedAt.toISOString(),
    id: r.id,
    outcome: r.outcome,
    position: r.chainSeq,
    prevHash: r.prevHash ?? null,
    recordedAt: r.recordedAt.toISOString(),
    requestId: r.requestId,
    scope: r.scope,
    startedAt: r.startedAt.toISOString(),
    status: r.status,
    subjectDigest: r.subjectDigest,
    subjectKind: r.subjectKind,
    upstreamRef: r.upstreamRef ?? null,
    v: 1,
    workspaceId: r.workspaceId,
  };
  return JSON.stringify(fields);
}

export function hashAudit(r: Hashed): string {
  return createHash(CHAIN_ALGORITHM).update(canonicalAudit(r), 'utf8').digest('hex');
}

const chainLockKey = (workspaceId: string) => lockKey('audit-chain', workspaceId);

/** Timestamps are hashed at millisecond precision: store exactly what was hashed. */
const ms = (d: Date) => new Date(Math.floor(d.getTime()));

/** Now, to the millisecond; the database clock set startedAt, so a slightly behind app clock never finishes before it. */
export function auditFinishedAt(startedAt: Date): Date {
  const now = ms(new Date());
  return now < ms(startedAt) ? ms(startedAt) : now;
}

/**
 * A record's canonical serialisation around the two fields that only the chain's head decides: `position` and
 * `prevHash` are adjacent in it (keys sorted), so it is the text before `position`'s value, and after `prevHash`'s.
 * The cut is found by serialising the record with stand-in values: that exact key/value sequence cannot occur inside
 * a string value, where every quote is escaped.
 */
function canonicalAroundHead(r: Omit<Hashed, 'chainSeq' | 'prevHash'>): { before: string; after: string } {
  const standIn = { chainSeq: -1, prevHash: '\u0000head' };
  const cut = `"position":${JSON.stringify(standIn.chainSeq)},"prevHash":${JSON.stringify(standIn.prevHash)}`;
  const canonical = canonicalAudit({ ...r, ...standIn });
  const at = canonical.indexOf(cut);
  if (at < 0 || canonical.lastIndexOf(cut) !== at) throw new Error('canonical audit form: position/prevHash not found');
  return { before: `${canonical.slice(0, at)}"position":`, after: canonical.slice(at + cut.length) };
}

/**
 * The columns insertAtHead sets, in the order of its select list: all of them (checked against the table when this
 * module loads).
 */
const INSERTED_COLUMNS = [
  'id', 'workspace_id', 'request_id', 'action', 'scope', 'subject_kind', 'subject_digest', 'actor_type', 'actor_id',
  'upstream_ref', 'status', 'outcome', 'counts', 'error_code', 'started_at', 'finished_at', 'recorded_at',
  'chain_seq', 'prev_hash', 'hash',
];
{
  const table = Object.values(getTableColumns(auditRecords)).map((c) => c.name);
  if ([...table].sort().join() !== [...INSERTED_COLUMNS].sort().join()) {
    throw new Error('audit_records has columns the chain append does not set: update insertAtHead');
  }
}

/**
 * Appends the record at the chain's head in one statement: reads the head (under the chain lock, taken by the
 * statement sent just before it), takes the next position and links the previous hash, and hashes the canonical form
 * with that position and link spliced in (`canonicalAroundHead`), exactly what hashAudit computes.
 */
const insertAtHead = prebuiltSql<{ chainSeq: number; prevHash: string | null; hash: string }>(
  () => sql`
    insert into ${auditRecords} (${sql.raw(INSERTED_COLUMNS.join(', '))})
    select ${p('id')}, ${p('workspaceId')}, ${p('requestId')}, ${p('action')}, ${p('scope')}, ${p('subjectKind')},
           ${p('subjectDigest')}, ${p('actorType')}, ${p('actorId')}, ${p('upstreamRef')}, ${p('status')},
           ${p('outcome')}, ${p('counts')}::jsonb, ${p('errorCode')}, ${p('startedAt')}::timestamptz,
           ${p('finishedAt')}::timestamptz, ${p('recordedAt')}::timestamptz, next.seq, head.hash,
           encode(sha256(convert_to(
             ${p('before')}::text || next.seq::text || ',"prevHash":' || coalesce(to_json(head.hash)::text, 'null')
               || ${p('after')}::text,
             'UTF8')), 'hex')
    from (select 1) as one
    left join lateral (
      select ${auditRecords.chainSeq} as seq, ${auditRecords.hash} as hash from ${auditRecords}
      where ${auditRecords.workspaceId} = ${p('workspaceId')} and ${auditRecords.chainSeq} is not null
      order by ${auditRecords.chainSeq} desc limit 1
    ) as head on true
    cross join lateral (select coalesce(head.seq, 0) + 1 as seq) as next
    returning chain_seq::int8 as "chainSeq", prev_hash as "prevHash", hash`,
);

/**
 * Appends a record to its workspace's chain inside the caller's transaction. The chain lock is held until that
 * transaction ends, so two completions in one workspace cannot claim the same position; the head is read after the
 * lock is granted (by a fresh statement, so a head committed while we waited is seen).
 */
export async function appendAudit(tx: Tx, values: NewAuditRecord): Promise<AuditRecord> {
  const startedAt = ms(values.startedAt);
  const finishedAt = values.finishedAt ? ms(values.finishedAt) : auditFinishedAt(startedAt);
  const fields: Omit<Hashed, 'chainSeq' | 'prevHash'> = {
    id: values.id ?? newId('aud'),
    workspaceId: values.workspaceId,
    requestId: values.requestId,
    action: values.action,
    scope: values.scope,
    subjectKind: values.subjectKind,
    subjectDigest: values.subjectDigest,
    actorType: values.actorType,
    actorId: values.actorId ?? null,
    upstreamRef: values.upstreamRef ?? null,
    status: values.status,
    outcome: values.outcome,
    counts: values.counts ?? {},
    errorCode: values.errorCode ?? null,
    startedAt,
    finishedAt,
    recordedAt: finishedAt,
  };
  // Sent together, run in order: the insert starts once the chain lock is held, so (read committed: a snapshot per
  // statement) it sees the record the previous holder committed. One round trip, and the lock is held from there to
  // the commit only.
  const [, [linked]] = await Promise.all([
    lockKeys(tx, 'exclusive', [chainLockKey(values.workspaceId)]),
    insertAtHead.run(tx, {
      ...fields,
      counts: JSON.stringify(fields.counts),
      startedAt: startedAt.toISOString(),
      finishedAt: finishedAt.toISOString(),
      recordedAt: finishedAt.toISOString(),
      ...canonicalAroundHead(fields),
    }),
  ]);
  // Every column is set here (nothing is left to a default or a trigger), so the stored row is this one.
  return { ...fields, chainSeq: Number(linked!.chainSeq), prevHash: linked!.prevHash, hash: linked!.hash };
}

/** The chain facts a privacy team attaches as proof. */
export function chainView(r: AuditRecord) {
  return {
    algorithm: CHAIN_ALGORITHM,
    position: r.chainSeq,
    prevHash: r.prevHash,
    hash: r.hash,
    canonical: r.chainSeq === null ? null : canonicalAudit(r),
    /** Recomputed now from the stored fields: false means the row no longer matches what was written. */
    intact: r.chainSeq === null ? null : hashAudit(r) === r.hash,
  };
}

export type ChainProblem =
  | 'hash_mismatch'
  | 'prev_hash_mismatch'
  | 'missing_record'
  | 'unchained_record'
  | 'dangling_request_reference';

export interface ChainBreak {
  problem: ChainProblem;
  /** Chain position where the break was found (the expected position for a missing record). */
  position: number | null;
  recordId: string | null;
  detail: string;
}

export interface WorkspaceChainReport {
  workspaceId: string;
  ok: boolean;
  records: number;
  /** The last record of the intact chain: a hash kept elsewhere is checked later through the record's id. */
  head: { position: number; hash: string; recordId: string } | null;
  /** Records written before the chain existed (migration 0003); not covered by it. */
  legacyRecords: number;
  firstBreak: ChainBreak | null;
}

const VERIFY_BATCH = 1000;

/**
 * Walks one workspace's chain in position order and reports the first broken link: a record whose stored hash does
 * not match its fields, a record that does not point at its predecessor's hash, a gap in positions (a deleted
 * record), a record outside the chain (written after it began, or at a position below 1), or a request whose audit
 * record is gone (which also catches a deleted last record).
 */
export async function verifyWorkspaceChain(db: Db, workspaceId: string): Promise<WorkspaceChainReport> {
  const report: WorkspaceChainReport = { workspaceId, ok: true, records: 0, head: null, legacyRecords: 0, firstBreak: null };
  const fail = (b: ChainBreak) => {
    report.ok = false;
    report.firstBreak = b;
    return report;
  };

  let expected = 1;
  let prevHash: string | null = null;
  let firstRecordedAt: Date | null = null;
  for (;;) {
    const rows = await db
      .select()
      .from(auditRecords)
      .where(
        and(
          eq(auditRecords.workspaceId, workspaceId),
          isNotNull(auditRecords.chainSeq),
          // The first batch from the lowest position stored, so a record moved below position 1 is seen.
          expected === 1 ? undefined : gt(auditRecords.chainSeq, expected - 1),
        ),
      )
      .orderBy(asc(auditRecords.chainSeq))
      .limit(VERIFY_BATCH);
    for (const r of rows) {
      const position = r.chainSeq!;
      if (position < 1) {
        return fail({
          problem: 'unchained_record',
          position: null,
          recordId: r.id,
          detail: `a record has position ${position}, before the chain's first: it was moved out of the chain`,
        });
      }
      firstRecordedAt ??= r.recordedAt;
      if (position !== expected) {
        return fail({
          problem: 'missing_record',
          position: expected,
          recordId: null,
          detail: `positions ${expected}..${position - 1} are missing (the next record present is ${r.id})`,
        });
      }
      if (r.prevHash !== prevHash) {
        return fail({
          problem: 'prev_hash_mismatch',
          position,
          recordId: r.id,
          detail: 'the record does not point at the hash of the record before it',
        });
      }
      if (r.hash !== hashAudit(r)) {
        return fail({
          problem: 'hash_mismatch',
          position,
          recordId: r.id,
          detail: 'the stored fields no longer match the record hash: the row was changed after it was written',
        });
      }
      report.records += 1;
      report.head = { position, hash: r.hash, recordId: r.id };
      prevHash = r.hash;
      expected += 1;
    }
    if (rows.length < VERIFY_BATCH) break;
  }

  const legacy = await db
    .select({ id: auditRecords.id, recordedAt: auditRecords.recordedAt })
    .from(auditRecords)
    .where(and(eq(auditRecords.workspaceId, workspaceId), isNull(auditRecords.chainSeq)))
    .orderBy(asc(auditRecords.recordedAt));
  report.legacyRecords = legacy.length;
  const late = firstRecordedAt ? legacy.find((l) => l.recordedAt >= firstRecordedAt!) : undefined;
  if (late) {
    return fail({
      problem: 'unchained_record',
      position: null,
      recordId: late.id,
      detail: 'a record without a chain position was written after the chain began: its chain fields were removed',
    });
  }

  const [dangling] = await db
    .select({ requestId: dsrRequests.id, auditRecordId: dsrRequests.auditRecordId })
    .from(dsrRequests)
    .where(
      and(
        eq(dsrRequests.workspaceId, workspaceId),
        isNotNull(dsrRequests.auditRecordId),
        // In the request's own workspace: a record moved to another one is gone from this chain.
        sql`not exists (select 1 from ${auditRecords} where ${auditRecords.id} = ${dsrRequests.auditRecordId}
                          and ${auditRecords.workspaceId} = ${dsrRequests.workspaceId})`,
      ),
    )
    .limit(1);
  if (dangling) {
    return fail({
      problem: 'dangling_request_reference',
      position: null,
      recordId: dangling.auditRecordId,
      detail: `request ${dangling.requestId} points at an audit record that is no longer in its workspace`,
    });
  }
  return report;
}

/** Verifies one workspace, or every workspace that has audit records. */
export async function verifyChains(db: Db, workspaceId?: string): Promise<{ ok: boolean; workspaces: WorkspaceChainReport[] }> {
  const ids = workspaceId
    ? [workspaceId]
    : (await db.select({ id: workspaces.id }).from(workspaces).orderBy(asc(workspaces.id))).map((r) => r.id);
  const reports: WorkspaceChainReport[] = [];
  for (const id of ids) reports.push(await verifyWorkspaceChain(db, id));
  return { ok: reports.every((w) => w.ok), workspaces: reports };
}
