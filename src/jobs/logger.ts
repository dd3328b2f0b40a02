import { Logger as GraphileLogger } from 'graphile-worker';
import type { Logger } from '../lib/logger.ts';

/** graphile-worker logs through pino; its messages carry job ids and task names, never payload contents. */
export function graphileLogger(logger: Logger): GraphileLogger {
  const child = logger.child({ component: 'worker' });
  return new GraphileLogger(() => (level, message, meta) => {
    const fields = { scope: meta && typeof meta === 'object' ? pickScope(meta) : undefined };
    switch (level) {
      case 'error':
        child.error(fields, message);
        break;
      case 'warning':
        child.warn(fields, message);
        break;
      case 'info':
        child.info(fields, message);
        break;
      default:
        child.debug(fields, message);
    }
  });
}

function pickScope(meta: object): Record<string, unknown> | undefined {
  const scope = (meta as { scope?: Record<string, unknown> }).scope;
  if (!scope) return undefined;
  const { label, workerId, taskIdentifier, jobId } = scope;
  return { label, workerId, taskIdentifier, jobId };
}
