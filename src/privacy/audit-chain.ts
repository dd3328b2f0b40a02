import { createHash } from 'node:crypto';
import { and, asc, desc, eq, getTableColumns, gt, isNotNull, isNull, sql } from 'drizzle-orm';
import type { Db, Tx } from '../db/client.ts';
import { lockKeys } from '../db/locks.ts';
import { auditRecords, dsrRequests, workspaces } from '../db/schema/index.ts';
import { lockKey } from '../lib/digest.ts';
import { newId } from '../lib/ids.ts';
import { p, prebuilt } from '../db/prebuilt.ts';

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

/**
 * Appends a record to its workspace's chain inside the caller's transaction. The chain lock is held until that
 * transaction ends, so two completions in one workspace cannot claim the same position; the previous head is read
 * after the lock is granted (a fresh statement, so a head committed while we waited is seen).
 */
/** Now, to the millisecond; the database clock set startedAt, so a slightly behind app clock never finishes before it. */
export function auditFinishedAt(startedAt: Date): Date {
  const now = ms(new Date());
  return now < ms(startedAt) ? ms(startedAt) : now;
}

const chainHead = prebuilt((b) =>
  b
    .select({ seq: auditRecords.chainSeq, hash: auditRecords.hash })
    .from(auditRecords)
    .where(and(eq(auditRecords.workspaceId, p('workspaceId')), isNotNull(auditRecords.chainSeq)))
    .orderBy(desc(auditRecords.chainSeq))
    .limit(1),
);

/** Every column, each from the record's field of the same name. */
const insertAudit = prebuilt((b) =>
  b
    .insert(auditRecords)
    .values(
      Object.fromEntries(Object.keys(getTableColumns(auditRecords)).map((k) => [k, p(k)])) as never,
    ),
);

export async function appendAudit(tx: Tx, values: NewAuditRecord): Promise<AuditRecord> {
  // Sent together, run in order: the head is read by a statement that starts once the chain lock is held, so (read
  // committed: a snapshot per statement) it sees the record the previous holder committed. One round trip, not two.
  const [, [head]] = await Promise.all([
    lockKeys(tx, 'exclusive', [chainLockKey(values.workspaceId)]),
    chainHead.run(tx, { workspaceId: values.workspaceId }),
  ]);
  const startedAt = ms(values.startedAt);
  const finishedAt = values.finishedAt ? ms(values.finishedAt) : auditFinishedAt(startedAt);
  const record: Hashed = {
    id: values.id ?? newId('aud'),
    workspaceId: values.workspaceId,
    chainSeq: (head?.seq ?? 0) + 1,
    prevHash: head?.hash ?? null,
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
  // Every column is set here (nothing is left to a default or a trigger), so the stored row is this one; not reading
  // it back saves mapping a whole row.
  const row: AuditRecord = { ...record, hash: hashAudit(record) };
  await insertAudit.run(tx, row);
  return row;
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
  head: { position: number; hash: string } | null;
  /** Records written before the chain existed (migration 0003); not covered by it. */
  legacyRecords: number;
  firstBreak: ChainBreak | null;
}

const VERIFY_BATCH = 1000;

/**
 * Walks one workspace's chain in position order and reports the first broken link: a record whose stored hash does
 * not match its fields, a record that does not point at its predecessor's hash, a gap in positions (a deleted
 * record), a record outside the chain written after it began, or a request whose audit record is gone (which also
 * catches a deleted last record).
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
          gt(auditRecords.chainSeq, expected - 1),
        ),
      )
      .orderBy(asc(auditRecords.chainSeq))
      .limit(VERIFY_BATCH);
    for (const r of rows) {
      const position = r.chainSeq!;
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
      report.head = { position, hash: r.hash };
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
        sql`not exists (select 1 from ${auditRecords} where ${auditRecords.id} = ${dsrRequests.auditRecordId})`,
      ),
    )
    .limit(1);
  if (dangling) {
    return fail({
      problem: 'dangling_request_reference',
      position: null,
      recordId: dangling.auditRecordId,
      detail: `request ${dangling.requestId} points at an audit record that no longer exists`,
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
