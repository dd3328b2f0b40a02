import type { Db } from '../db/client.ts';
import type { OutboxDispatcher } from '../jobs/outbox.ts';
import type { ActorType } from '../db/schema/index.ts';
import type { Logger } from '../lib/logger.ts';
import type { Sealer } from '../lib/sealing.ts';

/** What every privacy verb needs; built once at the entry and passed down. */
export interface PrivacyDeps {
  db: Db;
  digestKey: Buffer;
  logger: Logger;
  /** Seals the identifier a failed request keeps for a retry. */
  sealer: Sealer;
  /** graphile-worker attempts for execute_request before a transient failure is declared final. */
  executeMaxAttempts: number;
  /** Days a failed request keeps its sealed identifier for a retry. */
  failedSubjectRetentionDays: number;
  /** Hands jobs committed to the job outbox to graphile-worker (kick after such a commit). */
  outbox: OutboxDispatcher;
}

/** Who asked: lands on the request and on its audit record. */
export interface Actor {
  type: ActorType;
  /** API key id, admin id, connector id; null for the system. */
  id: string | null;
  /** Channel the request came through: api, admin, cli, connector, system. */
  source: string;
}
