import { pruneSessions } from '../accounts/sessions.ts';
import { pruneThrottle } from '../accounts/throttle.ts';
import { pruneSealedSubjects } from '../privacy/retry.ts';
import type { UpstreamDeps } from '../upstream/context.ts';

const DAY_MS = 86_400_000;

/**
 * Hourly housekeeping: ended sessions, stale login counters, and the sealed identifiers of requests that failed
 * longer ago than the retention period (after which they can no longer be retried, only resubmitted).
 */
export async function maintenanceTick(deps: UpstreamDeps) {
  const result = {
    sessions: await pruneSessions(deps.db),
    throttleCounters: await pruneThrottle(deps.db, DAY_MS),
    sealedSubjects: await pruneSealedSubjects(deps, deps.failedSubjectRetentionDays),
  };
  if (result.sessions + result.throttleCounters + result.sealedSubjects > 0) deps.logger.info(result, 'maintenance done');
  return result;
}
