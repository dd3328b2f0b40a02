/**
 * OneTrust Privacy Rights Automation. A DSR workflow's system subtask fires an HTTP action carrying our body template;
 * once the request is done we set that subtask's status and comment on the request through OneTrust's API.
 */
import { check, CheckFailed } from '../shared.ts';
import type { Connector } from '../types.ts';
import { configSchema, secretsSchema, type InboundAuth, type OneTrustConfig, type OneTrustSecrets } from './config.ts';
import { parseInbound, verifyInbound } from './inbound.ts';
import { reportOutcome, requestToken } from './report.ts';

export { DEFAULT_REQUEST_TYPES } from './config.ts';
export type { OneTrustConfig, OneTrustSecrets } from './config.ts';

function expectedCredential(auth: InboundAuth): string {
  switch (auth.type) {
    case 'bearer':
      return 'OneTrust must send "Authorization: Bearer <inboundSecret>" (a Bearer Token credential)';
    case 'api_key':
      return `OneTrust must send the header "${auth.header}: <inboundSecret>" (an API Key credential)`;
    case 'basic':
      return 'OneTrust must send Basic authentication with the configured username and <inboundSecret> as password';
  }
}

export const onetrust: Connector<OneTrustConfig, OneTrustSecrets> = {
  vendor: 'onetrust',
  // A subtask's status can be set and comments added at any time: a FAILED subtask is told the outcome of a retry.
  laterOutcome: 'at_once',
  configSchema,
  secretsSchema,
  inboundSecrets: ['inboundSecret'],

  async verify(req, conn) {
    verifyInbound(req, conn.config.inboundAuth, conn.secrets.inboundSecret);
    return {};
  },

  parse(req, conn) {
    return { kind: 'tickets', tickets: [parseInbound(req, conn.config)] };
  },

  report: reportOutcome,

  async test(conn, ctx) {
    const checks = [
      await check('inbound secret', async () => {
        if (!conn.secrets.inboundSecret.trim()) throw new CheckFailed('inboundSecret is empty');
        return expectedCredential(conn.config.inboundAuth);
      }),
      await check('oauth token', async () => {
        const token = await requestToken(conn, ctx);
        if (token.ok) {
          const lifetime = token.expiresInS === undefined ? '' : ` valid for ${token.expiresInS} s`;
          return `obtained a token${lifetime}; its scopes (DSAR_WRITE) are first exercised by a report`;
        }
        if (token.status === 400 || token.status === 401) {
          throw new CheckFailed(
            `${token.result.error}: the token endpoint refused the client credentials (check clientId and clientSecret)`,
          );
        }
        throw new CheckFailed(token.result.error);
      }),
    ];
    return { ok: checks.every((c) => c.ok), checks };
  },
};
