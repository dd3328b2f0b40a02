import type { SQL } from 'drizzle-orm';
import type { Db } from './client.ts';

/** Rows one prune statement removes at most: each batch commits on its own, so no lock is held for long. */
export const PRUNE_BATCH = 1_000;
/** Batches one run takes at most per prune; a larger backlog (the first tick after an upgrade) goes on next tick. */
export const PRUNE_MAX_BATCHES = 100;

export interface PruneOptions {
  batchSize?: number;
  maxBatches?: number;
}

/**
 * Runs a batched prune (`statement(limit)` removes at most `limit` rows and returns one row for each) until a batch
 * comes back short, or the cap is reached. Every periodic prune goes through here.
 */
export async function inBatches(db: Db, statement: (limit: number) => SQL, opts: PruneOptions = {}): Promise<number> {
  const batchSize = opts.batchSize ?? PRUNE_BATCH;
  const maxBatches = opts.maxBatches ?? PRUNE_MAX_BATCHES;
  let total = 0;
  for (let i = 0; i < maxBatches; i++) {
    const rows = await db.execute(statement(batchSize));
    total += rows.length;
    if (rows.length < batchSize) break;
  }
  return total;
}
