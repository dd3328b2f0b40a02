import type { TaskList } from 'graphile-worker';
import { z } from 'zod';
import { executeRequest, failAbandonedRequests } from '../privacy/execute.ts';
import type { UpstreamDeps } from '../upstream/context.ts';
import { connectorsTick, pollConnector } from '../upstream/poll.ts';
import { deliverReport, reportNow, reportPayload } from '../upstream/report.ts';
import { maintenanceTick } from './maintenance.ts';
import { errorCodeOf } from '../db/errors.ts';

// Jobs outlive code and may be added from SQL: parse every payload before trusting it.
const executeRequestPayload = z.object({ requestId: z.string().regex(/^req_[0-9a-z]{25}$/) });
const pollConnectorPayload = z.object({ connectorId: z.string().regex(/^con_[0-9a-z]{25}$/) });

/**
 * Cron entries, in graphile-worker's crontab format: the connectors fan-out and the sweep of requests whose job gave
 * up every minute, housekeeping hourly.
 */
export const CRONTAB = ['* * * * * connectors_tick', '* * * * * requests_tick', '17 * * * * maintenance_tick'].join('\n');

export function taskList(deps: UpstreamDeps): TaskList {
  // Retrying cannot fix a malformed payload; log and let the job complete.
  const parse = <T>(schema: z.ZodType<T>, payload: unknown, task: string, jobId: string): T | undefined => {
    const parsed = schema.safeParse(payload);
    if (!parsed.success) deps.logger.error({ task, jobId }, 'malformed job payload; dropping the job');
    return parsed.success ? parsed.data : undefined;
  };
  return {
    execute_request: async (payload, helpers) => {
      const p = parse(executeRequestPayload, payload, 'execute_request', helpers.job.id);
      if (!p) return;
      const result = await executeRequest(deps, p.requestId, { attempt: helpers.job.attempts, maxAttempts: helpers.job.max_attempts });
      // The proof goes out from this job, not after a report job waited for a slot. A report it could not deliver
      // here is put back in the outbox (reportNow kicks the dispatcher then); a row it found gone was already taken
      // by a dispatcher. Only when reportNow itself failed may rows be left unclaimed: kick for those. (Kicking
      // after every job cost a dispatch statement per ticket, nearly always for an empty outbox.)
      try {
        if (result.kind !== 'skipped') await reportNow(deps, result.reports);
      } catch (err) {
        // The request is finished and committed; a report not claimed stays in the outbox for its own job.
        deps.logger.warn({ requestId: p.requestId, errorCode: errorCodeOf(err) }, 'reports left to their jobs');
        deps.outbox.kick();
      }
    },
    report_upstream: async (payload, helpers) => {
      const p = parse(reportPayload, payload, 'report_upstream', helpers.job.id);
      if (!p) return;
      await deliverReport(deps, p.ticketId, p.attempt);
    },
    poll_connector: async (payload, helpers) => {
      const p = parse(pollConnectorPayload, payload, 'poll_connector', helpers.job.id);
      if (!p) return;
      await pollConnector(deps, p.connectorId);
    },
    connectors_tick: async () => {
      await connectorsTick(deps);
    },
    requests_tick: async () => {
      const { reports } = await failAbandonedRequests(deps);
      if (reports.length > 0) deps.outbox.kick();
    },
    maintenance_tick: async () => {
      await maintenanceTick(deps);
    },
  };
}
