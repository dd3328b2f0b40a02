import type { ConnectorCache } from '../../connectors/types.ts';
import type { HttpClient } from '../lib/outbound.ts';
import type { Sealer } from '../lib/sealing.ts';
import type { PrivacyDeps } from '../privacy/context.ts';

/** How report deliveries are retried (see REPORT_* in config.ts). */
export interface ReportPolicy {
  maxAttempts: number;
  backoffBaseMs: number;
  backoffMaxMs: number;
  /** Every vendor call of one attempt is over within this long of the attempt's start. */
  attemptTimeoutMs: number;
}

/** What the connector side of the core needs on top of the privacy verbs. */
export interface UpstreamDeps extends PrivacyDeps {
  sealer: Sealer;
  http: HttpClient;
  cache: ConnectorCache;
  reportPolicy: ReportPolicy;
  /** Days a graphile-worker job out of attempts is kept after its last attempt was due (the hourly tick prunes it). */
  failedJobRetentionDays: number;
}
