import type { OpenAPIHono } from '@hono/zod-openapi';
import type postgres from 'postgres';
import type { WebhookConnectors } from '../upstream/store.ts';
import type { Context } from 'hono';
import type { AuthSettings } from '../config.ts';
import type { UpstreamDeps } from '../upstream/context.ts';
import type { Principal } from './auth.ts';

export interface AppDeps extends UpstreamDeps {
  sql: postgres.Sql;
  bodyLimitBytes: number;
  /** Connectors opened for webhooks, kept between requests. */
  webhookConnectors: WebhookConnectors;
  /** Sessions, recent authentication, login rate limit. */
  auth: AuthSettings;
  /** The connection's peer address as the runtime sees it (Node socket, Workers' CF-Connecting-IP). */
  remoteAddress?: (c: Context<AppEnv>) => string | undefined;
  /** Where vendors reach this server; shown as each connector's webhook URL. */
  publicBaseUrl?: string;
  /** Reads a swagger-ui-dist file for the docs page; the runtime decides how (file system, Workers assets). */
  docsAsset?: (file: string) => Promise<Uint8Array<ArrayBuffer> | null>;
}

export interface AppEnv {
  Variables: {
    requestId: string;
    auth: Principal;
  };
}

export type App = OpenAPIHono<AppEnv>;
