import { and, asc, eq, gt, isNotNull, not, like, type SQL } from 'drizzle-orm';
import type { PgColumn, PgTable } from 'drizzle-orm/pg-core';
import type { Db } from '../db/client.ts';
import { connectors, dsrRequests, upstreamTickets } from '../db/schema/index.ts';
import type { Sealer } from '../lib/sealing.ts';
import { subjectSealContext } from '../privacy/execute.ts';
import { secretsContext } from './store.ts';
import { ticketSecretContext } from './tickets.ts';

export interface ResealReport {
  keyId: string;
  /** Per kind of sealed value: how many were re-sealed, and how many were already under the current key. */
  connectorSecrets: { resealed: number; current: number };
  ticketSecrets: { resealed: number; current: number };
  failedRequestSubjects: { resealed: number; current: number };
}

interface Target {
  table: PgTable;
  id: PgColumn;
  sealed: PgColumn;
  /** The property name of `sealed` in the table's drizzle definition. */
  field: string;
  context: (id: string) => string;
}

const BATCH = 200;

/**
 * Re-seals every sealed value (connector secrets, ticket nonces, failed requests' identifiers) under the sealer's
 * current master key. Each value is rewritten in its own statement guarded by its old ciphertext, so a secret
 * replaced concurrently by an admin is never overwritten with a stale one, and running servers keep working
 * throughout: they open both key ids (README, "Rotating the master key"). Safe to run again; a second run finds
 * nothing to do.
 */
export async function resealAll(db: Db, sealer: Sealer): Promise<ResealReport> {
  const run = (t: Target) => resealColumn(db, sealer, t);
  return {
    keyId: sealer.currentKeyId,
    connectorSecrets: await run({ table: connectors, id: connectors.id, sealed: connectors.secretsSealed, field: 'secretsSealed', context: secretsContext }),
    ticketSecrets: await run({
      table: upstreamTickets,
      id: upstreamTickets.id,
      sealed: upstreamTickets.secretSealed,
      field: 'secretSealed',
      context: ticketSecretContext,
    }),
    failedRequestSubjects: await run({
      table: dsrRequests,
      id: dsrRequests.id,
      sealed: dsrRequests.subjectSealed,
      field: 'subjectSealed',
      context: subjectSealContext,
    }),
  };
}

async function resealColumn(db: Db, sealer: Sealer, t: Target): Promise<{ resealed: number; current: number }> {
  const currentPrefix = `v1.${sealer.currentKeyId}.%`;
  const current = await db.$count(t.table, and(isNotNull(t.sealed), like(t.sealed, currentPrefix)));
  let resealed = 0;
  let after = '';
  for (;;) {
    const stale: SQL | undefined = and(isNotNull(t.sealed), not(like(t.sealed, currentPrefix)), gt(t.id, after));
    const rows = (await db
      .select({ id: t.id, sealed: t.sealed })
      .from(t.table)
      .where(stale)
      .orderBy(asc(t.id))
      .limit(BATCH)) as { id: string; sealed: string }[];
    for (const r of rows) {
      const fresh = sealer.seal(sealer.open(r.sealed, t.context(r.id)), t.context(r.id));
      const updated = await db
        .update(t.table)
        .set({ [t.field]: fresh })
        .where(and(eq(t.id, r.id), eq(t.sealed, r.sealed)))
        .returning({ id: t.id });
      resealed += updated.length;
    }
    if (rows.length < BATCH) break;
    after = rows[rows.length - 1]!.id;
  }
  return { resealed, current };
}
