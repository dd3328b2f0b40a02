import { pruneSessions } from '../accounts/sessions.ts';
import { pruneThrottle } from '../accounts/throttle.ts';
import { pruneSealedSubjects } from '../privacy/retry.ts';
import type { UpstreamDeps } from '../upstream/context.ts';
import { prunePreviousSecrets } from '../upstream/store.ts';

const DAY_MS = 86_400_000;

/**
 * Hourly housekeeping: ended sessions, stale login counters, the sealed identifiers of requests that failed
 * longer ago than the retention period (after which they can no longer be retried, only resubmitted), and replaced
 * inbound secrets whose grace period has ended.
 */
export async function maintenanceTick(deps: UpstreamDeps) {
  const result = {
    sessions: await pruneSessions(deps.db),
    throttleCounters: await pruneThrottle(deps.db, DAY_MS),
    sealedSubjects: await pruneSealedSubjects(deps, deps.failedSubjectRetentionDays),
    previousSecrets: await prunePreviousSecrets(deps.db),
  };
  if (Object.values(result).some((n) => n > 0)) deps.logger.info(result, 'maintenance done');
  return result;
}
