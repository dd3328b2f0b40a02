import { and, asc, eq, gt, isNotNull, not, like, type SQL } from 'drizzle-orm';
import type { PgColumn, PgTable } from 'drizzle-orm/pg-core';
import type { Db } from '../db/client.ts';
import { connectors, dsrRequests, upstreamTickets } from '../db/schema/index.ts';
import { SealError, type Sealer } from '../lib/sealing.ts';
import { subjectSealContext } from '../privacy/execute.ts';
import { previousSecretsContext, secretsContext } from './store.ts';
import { ticketSecretContext } from './tickets.ts';

/**
 * Per kind of sealed value: how many were re-sealed, how many were already under the current key, and how many are
 * still not (`remaining`): the ones none of the configured keys opens (`unreadable`, by row id), and any rewritten
 * under an older key while the run went on by a process not yet sealing with the new one.
 */
export interface ResealCounts {
  resealed: number;
  current: number;
  remaining: number;
  unreadable: string[];
}

export interface ResealReport {
  keyId: string;
  connectorSecrets: ResealCounts;
  /** Inbound secrets kept for a grace period after they were replaced. */
  previousInboundSecrets: ResealCounts;
  ticketSecrets: ResealCounts;
  failedRequestSubjects: ResealCounts;
}

/** True when nothing is left under another key: only then may the old key be removed. */
export const resealComplete = (r: ResealReport): boolean =>
  [r.connectorSecrets, r.previousInboundSecrets, r.ticketSecrets, r.failedRequestSubjects].every((c) => c.remaining === 0);

interface Target {
  table: PgTable;
  id: PgColumn;
  sealed: PgColumn;
  /** The property name of `sealed` in the table's drizzle definition. */
  field: string;
  context: (id: string) => string;
}

const BATCH = 200;
/** Passes over a column: a value rewritten during one (its guarded update missed) is looked at again in the next. */
const PASSES = 3;

/**
 * Re-seals every sealed value (connector secrets and previous inbound secrets, ticket nonces, failed requests'
 * identifiers) under the sealer's
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
    previousInboundSecrets: await run({
      table: connectors,
      id: connectors.id,
      sealed: connectors.previousSecretsSealed,
      field: 'previousSecretsSealed',
      context: previousSecretsContext,
    }),
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

async function resealColumn(db: Db, sealer: Sealer, t: Target): Promise<ResealCounts> {
  const currentPrefix = `v1.${sealer.currentKeyId}.%`;
  const underCurrentKey = like(t.sealed, currentPrefix);
  const current = await db.$count(t.table, and(isNotNull(t.sealed), underCurrentKey));
  let resealed = 0;
  // Ciphertexts no configured key opens, with their rows: skipped (the rest are still re-sealed) and reported.
  const unreadable = new Map<string, string>();
  for (let pass = 0; pass < PASSES; pass++) {
    let missed = 0;
    let after = '';
    for (;;) {
      const stale: SQL | undefined = and(isNotNull(t.sealed), not(underCurrentKey), gt(t.id, after));
      const rows = (await db
        .select({ id: t.id, sealed: t.sealed })
        .from(t.table)
        .where(stale)
        .orderBy(asc(t.id))
        .limit(BATCH)) as { id: string; sealed: string }[];
      for (const r of rows) {
        if (unreadable.has(r.sealed)) continue;
        let plain: string;
        try {
          plain = sealer.open(r.sealed, t.context(r.id));
        } catch (err) {
          if (!(err instanceof SealError)) throw err;
          unreadable.set(r.sealed, r.id);
          continue;
        }
        const updated = await db
          .update(t.table)
          .set({ [t.field]: sealer.seal(plain, t.context(r.id)) })
          .where(and(eq(t.id, r.id), eq(t.sealed, r.sealed)))
          .returning({ id: t.id });
        resealed += updated.length;
        missed += 1 - updated.length;
      }
      if (rows.length < BATCH) break;
      after = rows[rows.length - 1]!.id;
    }
    if (missed === 0) break;
  }
  const remaining = await db.$count(t.table, and(isNotNull(t.sealed), not(underCurrentKey)));
  return { resealed, current, remaining, unreadable: [...unreadable.values()].sort() };
}
