import type { TaskList } from 'graphile-worker';
import { z } from 'zod';
import type { PrivacyDeps } from '../privacy/context.ts';
import { executeRequest } from '../privacy/execute.ts';

// Jobs outlive code and may be added from SQL: parse every payload before trusting it.
const executeRequestPayload = z.object({ requestId: z.string().regex(/^req_[0-9a-z]{25}$/) });

export function taskList(deps: PrivacyDeps): TaskList {
  return {
    execute_request: async (payload, helpers) => {
      const parsed = executeRequestPayload.safeParse(payload);
      if (!parsed.success) {
        // Retrying cannot fix a malformed payload; log and let the job complete.
        helpers.logger.error(`execute_request: malformed payload for job ${helpers.job.id}`);
        return;
      }
      await executeRequest(deps, parsed.data.requestId, {
        attempt: helpers.job.attempts,
        maxAttempts: helpers.job.max_attempts,
      });
    },
  };
}
