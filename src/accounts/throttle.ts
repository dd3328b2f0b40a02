import { createHmac } from 'node:crypto';
import { inArray, sql, type SQL } from 'drizzle-orm';
import type { Db } from '../db/client.ts';
import { inBatches, type PruneOptions } from '../db/prune.ts';
import { authThrottle } from '../db/schema/index.ts';

/**
 * Password attempts are counted per account and per client address in a fixed window, in the database so every web
 * process shares the count. An attempt is reserved *before* the password is checked (one atomic upsert), so a burst
 * of concurrent guesses cannot all slip in under the limit; a success gives the reservation back.
 */
export interface ThrottleLimits {
  maxAttemptsPerAccount: number;
  maxAttemptsPerAddress: number;
  loginWindowMs: number;
}

export interface ThrottleKeys {
  account: string;
  address: string;
}

/** Keyed digests: the table never holds an email or an IP address. */
export function throttleKeys(digestKey: Buffer, workspaceId: string, email: string, address: string): ThrottleKeys {
  const digest = (s: string) => createHmac('sha256', digestKey).update(s).digest('hex');
  return {
    account: `acct:${digest(`login-account\u0000${workspaceId}\u0000${email}`)}`,
    address: `addr:${digest(`login-address\u0000${address}`)}`,
  };
}

/** Reserves one attempt on each key; returns the seconds to wait when either key is over its limit. */
export async function reserveAttempt(db: Db, keys: ThrottleKeys, limits: ThrottleLimits): Promise<{ retryAfterSeconds: number } | null> {
  const window = `${limits.loginWindowMs} milliseconds`;
  const rows = await db.execute<{ key: string; failures: number; remaining_ms: string }>(sql`
    insert into ${authThrottle} (key, window_started_at, failures)
    values (${keys.account}, now(), 1), (${keys.address}, now(), 1)
    on conflict (key) do update set
      failures = case when ${authThrottle.windowStartedAt} < now() - ${window}::interval then 1
                      else ${authThrottle.failures} + 1 end,
      window_started_at = case when ${authThrottle.windowStartedAt} < now() - ${window}::interval then now()
                               else ${authThrottle.windowStartedAt} end
    returning key, failures,
      extract(epoch from (window_started_at + ${window}::interval - now())) * 1000 as remaining_ms`);
  let wait = 0;
  for (const r of rows) {
    const limit = r.key === keys.account ? limits.maxAttemptsPerAccount : limits.maxAttemptsPerAddress;
    if (r.failures > limit) wait = Math.max(wait, Math.ceil(Number(r.remaining_ms) / 1000));
  }
  return wait > 0 ? { retryAfterSeconds: Math.max(1, wait) } : null;
}

/** After a correct password: the account starts afresh, and the address gets its attempt back. */
export async function releaseAttempt(db: Db, keys: ThrottleKeys): Promise<void> {
  await db.delete(authThrottle).where(inArray(authThrottle.key, [keys.account]));
  await db.execute(
    sql`update ${authThrottle} set failures = greatest(${authThrottle.failures} - 1, 0) where key = ${keys.address}`,
  );
}

/** Drops counters whose window started over `olderThanMs` ago (called from the periodic tick), batch by batch. */
export async function pruneThrottle(db: Db, olderThanMs: number, opts: PruneOptions = {}): Promise<number> {
  return inBatches(db, (limit) => staleThrottlePrune(olderThanMs, limit), opts);
}

/**
 * One batch of the counter prune, through auth_throttle_window_idx. A counter a login is updating right now (its row
 * locked) is left for the next tick. The plan is checked in query-plans.test.ts.
 */
export function staleThrottlePrune(olderThanMs: number, limit: number): SQL {
  return sql`
    with doomed as (
      select t.key from ${authThrottle} t
       where t.window_started_at < now() - ${`${olderThanMs} milliseconds`}::interval
       order by t.window_started_at
       limit ${limit}::int
       for update skip locked)
    delete from ${authThrottle} t using doomed where t.key = doomed.key
    returning 1`;
}
