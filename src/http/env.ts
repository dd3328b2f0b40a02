import type { OpenAPIHono } from '@hono/zod-openapi';
import type postgres from 'postgres';
import type { AuthInfo } from '../accounts/keys.ts';
import type { Db } from '../db/client.ts';
import type { Logger } from '../lib/logger.ts';

export interface AppDeps {
  db: Db;
  sql: postgres.Sql;
  digestKey: Buffer;
  logger: Logger;
  bodyLimitBytes: number;
  executeMaxAttempts: number;
  /** Reads a swagger-ui-dist file for the docs page; the runtime decides how (file system, Workers assets). */
  docsAsset?: (file: string) => Promise<Uint8Array<ArrayBuffer> | null>;
}

export interface AppEnv {
  Variables: {
    requestId: string;
    auth: AuthInfo;
  };
}

export type App = OpenAPIHono<AppEnv>;
