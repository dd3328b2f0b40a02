import { sql, type SQL } from 'drizzle-orm';
import { pruneSessions } from '../accounts/sessions.ts';
import { pruneThrottle } from '../accounts/throttle.ts';
import type { Db } from '../db/client.ts';
import { inBatches, type PruneOptions } from '../db/prune.ts';
import { dsrRequests } from '../db/schema/index.ts';
import { oldErasureMarkersPrune } from '../privacy/execute.ts';
import { pruneSealedSubjects } from '../privacy/retry.ts';
import type { UpstreamDeps } from '../upstream/context.ts';
import { forgottenRefusalsPrune } from '../upstream/refusals.ts';
import { prunePreviousSecrets } from '../upstream/store.ts';

const DAY_MS = 86_400_000;

/**
 * Hourly housekeeping: ended sessions, stale login counters, the sealed identifiers of requests that failed longer
 * ago than the retention period (after which they can no longer be retried, only resubmitted), replaced inbound
 * secrets whose grace period has ended, graphile-worker jobs that ran out of attempts long ago, the Transcend
 * refusals whose jobs are no longer listed, and erasure markers a day old.
 */
export async function maintenanceTick(deps: UpstreamDeps) {
  const result = {
    sessions: await pruneSessions(deps.db),
    throttleCounters: await pruneThrottle(deps.db, DAY_MS),
    sealedSubjects: await pruneSealedSubjects(deps, deps.failedSubjectRetentionDays),
    previousSecrets: await prunePreviousSecrets(deps.db),
    failedJobs: await pruneFailedJobs(deps.db, deps.failedJobRetentionDays),
    refusals: await inBatches(deps.db, forgottenRefusalsPrune),
    erasureMarkers: await inBatches(deps.db, oldErasureMarkersPrune),
  };
  if (Object.values(result).some((n) => n > 0)) deps.logger.info(result, 'maintenance done');
  return result;
}

/**
 * graphile-worker keeps a job that ran out of attempts for good (0.17 has no age-based cleanup; its
 * DELETE_PERMAFAILED_JOBS removes them all at once). Each of our jobs has its own source of truth (the request, the
 * vendor ticket, the connector's poll schedule), so such a row only tells an operator what went wrong: it is removed
 * once its last attempt was due `retentionDays` ago. Never a job a worker holds, and never an execute_request job whose
 * request is still pending: the minute tick (failAbandonedRequests) finds such requests through that very row.
 */
export async function pruneFailedJobs(db: Db, retentionDays: number, opts: PruneOptions = {}): Promise<number> {
  return inBatches(db, (limit) => failedJobsPrune(retentionDays, limit), opts);
}

/** One batch of the prune (its plan is checked in test/integration/query-plans.test.ts). */
export function failedJobsPrune(retentionDays: number, limit: number): SQL {
  // Through dsr_jobs_out_of_attempts_idx (migration 0023): only the jobs out of attempts are read, not the queue.
  // A row the minute tick has locked is skipped, and one changed meanwhile is read again before it goes (a job
  // given new attempts, e.g. by a retry of its request, no longer matches). locked_at is graphile-worker's own lock:
  // a job on its last attempt is out of attempts while it runs.
  return sql`
    with doomed as (
      select j.id from graphile_worker._private_jobs j
       where j.attempts >= j.max_attempts and j.locked_at is null
         and j.run_at < now() - make_interval(days => ${retentionDays}::int)
         and not exists (select 1 from ${dsrRequests} r
                          where r.id = j.key and r.status in ('queued', 'running'))
       order by j.run_at
       limit ${limit}::int
       for update of j skip locked)
    delete from graphile_worker._private_jobs j using doomed where j.id = doomed.id
    returning j.id`;
}
