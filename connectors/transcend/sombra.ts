/** Calls to Sombra, Transcend's gateway: URL, credentials, and errors an admin may read. */
import { OutboundError, type OutboundResponse } from '../../src/lib/outbound.ts';
import { CheckFailed } from '../shared.ts';
import type { AdapterContext } from '../types.ts';
import type { Config, TranscendConnector } from './config.ts';

/** A Sombra call that failed, with a message fit for an admin (no secrets, no identifiers); test() shows it as is. */
export class SombraError extends CheckFailed {
  override name = 'SombraError';
}

export function sombraUrl(config: Config, path: string): string {
  return `${config.sombraUrl.replace(/\/+$/, '')}${path}`;
}

/** The credentials every Sombra call carries; a self-hosted Sombra also wants its own key. */
export function authHeaders(conn: TranscendConnector): Record<string, string> {
  const headers: Record<string, string> = { authorization: `Bearer ${conn.secrets.apiKey}` };
  if (conn.config.selfHostedSombra) {
    if (!conn.secrets.sombraApiKey) {
      throw new SombraError('selfHostedSombra is true but the sombraApiKey secret is not set', 'config_error');
    }
    headers['x-sombra-authorization'] = `Bearer ${conn.secrets.sombraApiKey}`;
  }
  return headers;
}

/** An authenticated GET that only returns a 2xx; anything else is a SombraError prefixed with `what`. */
export async function sombraGet(
  conn: TranscendConnector,
  ctx: AdapterContext,
  path: string,
  what: string,
  accept = 'application/json',
): Promise<OutboundResponse> {
  let res: OutboundResponse;
  try {
    res = await ctx.http.request(sombraUrl(conn.config, path), { headers: { ...authHeaders(conn), accept } });
  } catch (err) {
    if (err instanceof OutboundError) throw new SombraError(`${what}: ${err.message}`, `upstream_${err.code}`);
    throw err;
  }
  if (res.status === 401 || res.status === 403) {
    throw new SombraError(`${what}: Sombra refused the API key (HTTP ${res.status})`, 'upstream_auth_refused');
  }
  if (res.status < 200 || res.status >= 300) throw new SombraError(`${what}: HTTP ${res.status}`, 'upstream_http_error');
  return res;
}
