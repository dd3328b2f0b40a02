import { and, desc, eq, inArray, type SQL } from 'drizzle-orm';
import type { Db, Tx } from '../db/client.ts';
import { dsrRequests, endUsers, legalHolds, type upstreamTickets } from '../db/schema/index.ts';
import { normalizeEmail, subjectDigest } from '../lib/digest.ts';
import { ticketsOf } from '../upstream/tickets.ts';
import type { Subject } from './intake.ts';

/** A profile as far as holds care: the two identifiers a hold on it may have been placed with. */
export interface HoldableProfile {
  externalId: string;
  /** Normalised. */
  email: string | null;
}

/** The digests a hold on these profiles would be keyed by, each once: their user ids and emails (also what a listing by
 * user id or email matches a request on once it has run: resolved_digests). */
export function heldDigests(digestKey: Buffer, workspaceId: string, profiles: HoldableProfile[]): string[] {
  const digests = profiles.flatMap((u) => [
    subjectDigest(digestKey, workspaceId, 'user_id', u.externalId),
    ...(u.email ? [subjectDigest(digestKey, workspaceId, 'email', u.email)] : []),
  ]);
  return [...new Set(digests)];
}

/**
 * The digests whose holds stop an erasure by this identifier (src/privacy/execute.ts checks the same set): its own,
 * and the user id and email of every profile that carries it today.
 */
export async function digestsCovering(
  db: Db | Tx,
  digestKey: Buffer,
  workspaceId: string,
  subject: Subject,
): Promise<string[]> {
  const carries =
    subject.kind === 'email'
      ? eq(endUsers.emailNormalized, normalizeEmail(subject.value))
      : eq(endUsers.externalId, subject.value);
  const profiles = await db
    .select({ externalId: endUsers.externalId, email: endUsers.emailNormalized })
    .from(endUsers)
    .where(and(eq(endUsers.workspaceId, workspaceId), carries));
  const own = subjectDigest(digestKey, workspaceId, subject.kind, subject.value);
  return [...new Set([own, ...heldDigests(digestKey, workspaceId, profiles)])];
}

/** How many of these digests are held (each digest holds at most one). */
export async function countHolds(db: Db | Tx, workspaceId: string, digests: string[]): Promise<number> {
  if (digests.length === 0) return 0;
  const rows = await db
    .select({ requestId: legalHolds.requestId })
    .from(legalHolds)
    .where(and(eq(legalHolds.workspaceId, workspaceId), inArray(legalHolds.subjectDigest, digests)));
  return rows.length;
}

export interface HoldRow {
  requestId: string;
  subjectKind: 'user_id' | 'email' | 'workspace';
  subjectDigest: string;
  heldAt: Date;
  source: string;
  actorType: string;
  actorId: string | null;
  externalRequestId: string | null;
  upstreamRef: string | null;
  auditRecordId: string | null;
  tickets: (typeof upstreamTickets.$inferSelect)[];
}

/**
 * The holds in force in a workspace, newest first (by the id of the request that placed each), with the request that
 * placed them and its vendor tickets, read in one snapshot. `after` is a condition on the placing request's id (the
 * cursor); `subject`, the holds that stop an erasure by that identifier.
 */
export async function listHolds(
  db: Db,
  digestKey: Buffer,
  workspaceId: string,
  opts: { subject?: Subject; after?: SQL; limit: number },
): Promise<HoldRow[]> {
  return db.transaction(
    async (tx) => {
      const digests = opts.subject ? await digestsCovering(tx, digestKey, workspaceId, opts.subject) : undefined;
      const holds = await holdsPage(tx, workspaceId, { digests, after: opts.after, limit: opts.limit });
      const ids = holds.map((h) => h.requestId);
      const requests = new Map(
        ids.length === 0
          ? []
          : (
              await tx
                .select()
                .from(dsrRequests)
                .where(and(eq(dsrRequests.workspaceId, workspaceId), inArray(dsrRequests.id, ids)))
            ).map((r) => [r.id, r]),
      );
      const tickets = await ticketsOf(tx, ids);
      return holds.map((h) => {
        // Requests are never pruned (they are the proof), so a hold always finds the one that placed it.
        const r = requests.get(h.requestId);
        if (!r) throw new Error('a legal hold without the request that placed it');
        return {
          requestId: h.requestId,
          subjectKind: r.subjectKind,
          subjectDigest: h.subjectDigest,
          heldAt: h.heldAt,
          source: r.source,
          actorType: r.actorType,
          actorId: r.actorId,
          externalRequestId: r.externalRequestId,
          upstreamRef: r.upstreamRef,
          auditRecordId: r.auditRecordId,
          tickets: tickets.get(h.requestId) ?? [],
        };
      });
    },
    { isolationLevel: 'repeatable read', accessMode: 'read only' },
  );
}

/**
 * One page of holds in force, newest first (its plan is checked in query-plans.test.ts). Their requests are read apart,
 * by id: joined, PostgreSQL may walk the requests' primary key through every other workspace's requests.
 */
export function holdsPage(db: Db | Tx, workspaceId: string, opts: { digests?: string[]; after?: SQL; limit: number }) {
  return db
    .select()
    .from(legalHolds)
    .where(
      and(
        eq(legalHolds.workspaceId, workspaceId),
        opts.digests ? inArray(legalHolds.subjectDigest, opts.digests) : undefined,
        opts.after,
      ),
    )
    .orderBy(desc(legalHolds.requestId))
    .limit(opts.limit);
}
