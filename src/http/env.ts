import type { OpenAPIHono } from '@hono/zod-openapi';
import type postgres from 'postgres';
import type { AuthInfo } from '../accounts/keys.ts';
import type { UpstreamDeps } from '../upstream/context.ts';

export interface AppDeps extends UpstreamDeps {
  sql: postgres.Sql;
  bodyLimitBytes: number;
  /** Where vendors reach this server; shown as each connector's webhook URL. */
  publicBaseUrl?: string;
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
