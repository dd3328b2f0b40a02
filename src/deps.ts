import { authSettings, reportSettings, type Env } from './config.ts';
import type { ConnectorCache } from '../connectors/types.ts';
import type { Database } from './db/client.ts';
import type { AppDeps } from './http/env.ts';
import type { Logger } from './lib/logger.ts';
import type { HttpClient } from './lib/outbound.ts';
import type { Sealer } from './lib/sealing.ts';
import { MemoryCache } from './upstream/cache.ts';
import { WebhookConnectors } from './upstream/store.ts';
import { OutboxDispatcher } from './jobs/outbox.ts';

/** Wires the service's dependencies from the parsed environment; one place for the server, the CLI and Workers. */
export function createDeps(opts: {
  env: Env;
  database: Database;
  digestKey: Buffer;
  sealer: Sealer;
  logger: Logger;
  http: HttpClient;
  cache?: ConnectorCache;
  docsAsset?: AppDeps['docsAsset'];
  remoteAddress?: AppDeps['remoteAddress'];
}): AppDeps {
  const { env } = opts;
  const db = opts.database.db;
  return {
    db,
    sql: opts.database.sql,
    digestKey: opts.digestKey,
    sealer: opts.sealer,
    logger: opts.logger,
    http: opts.http,
    cache: opts.cache ?? new MemoryCache(),
    reportPolicy: reportSettings(env),
    bodyLimitBytes: env.BODY_LIMIT_BYTES,
    webhookConnectors: new WebhookConnectors({ db, sealer: opts.sealer }),
    auth: authSettings(env),
    executeMaxAttempts: env.EXECUTE_MAX_ATTEMPTS,
    failedSubjectRetentionDays: env.FAILED_SUBJECT_RETENTION_DAYS,
    failedJobRetentionDays: env.FAILED_JOB_RETENTION_DAYS,
    outbox: new OutboxDispatcher(db, opts.logger),
    publicBaseUrl: env.PUBLIC_BASE_URL,
    docsAsset: opts.docsAsset,
    remoteAddress: opts.remoteAddress,
  };
}

export type NodeDepsOptions = Omit<Parameters<typeof createDeps>[0], 'http'>;
