/** Write-back to OneTrust: an OAuth client-credentials token, then the subtask status and a comment on the request. */
import { createHash } from 'node:crypto';
import { z } from 'zod';
import { classifyOutboundError, classifyResponse } from '../shared.ts';
import type { AdapterContext, ConnectorInstance, ReportResult, StoredTicket, TicketOutcome } from '../types.ts';
import type { OneTrustConfig, OneTrustSecrets } from './config.ts';

type Conn = ConnectorInstance<OneTrustConfig, OneTrustSecrets>;
type NotDelivered = Exclude<ReportResult, { kind: 'delivered' }>;

export const TOKEN_PATH = '/api/access/v1/oauth/token';
export const subtaskStatusPath = (subTaskId: string) =>
  `/api/datasubject/v2/subtasks/${encodeURIComponent(subTaskId)}/status`;
export const requestCommentsPath = (requestQueueRefId: string) =>
  `/api/datasubject/v2/requestqueues/${encodeURIComponent(requestQueueRefId)}/comments`;

/** Tokens are dropped this long before OneTrust says they expire, so a call never starts with a dying token. */
const EXPIRY_MARGIN_S = 60;

const tokenResponse = z.looseObject({ access_token: z.string().min(1), expires_in: z.coerce.number().optional() });

const storedUpstream = z.looseObject({
  requestQueueRefId: z.string().min(1),
  subTaskId: z.string().min(1).optional(),
});

function apiUrl(config: OneTrustConfig, path: string): string {
  return config.baseUrl.replace(/\/+$/, '') + path;
}

/**
 * Rotating the client secret or moving the tenant (baseUrl) changes the key, so a token issued to the old
 * credentials or by the old tenant is never reused, nor sent to another host.
 */
function tokenCacheKey(conn: Conn): string {
  const { clientId, clientSecret } = conn.secrets;
  const hash = createHash('sha256')
    .update(`${conn.config.baseUrl}\n${clientId}:${clientSecret}`, 'utf8')
    .digest('hex')
    .slice(0, 32);
  return `onetrust:token:${conn.id}:${hash}`;
}

export type TokenResult =
  | { ok: true; token: string; expiresInS?: number }
  /** `status` when OneTrust answered with an error. */
  | { ok: false; result: NotDelivered; status?: number };

/** A fresh token from OneTrust (never throws); cached when OneTrust says how long it lives. */
export async function requestToken(conn: Conn, ctx: AdapterContext): Promise<TokenResult> {
  const what = 'OneTrust token';
  try {
    const res = await ctx.http.request(apiUrl(conn.config, TOKEN_PATH), {
      method: 'POST',
      form: {
        grant_type: 'client_credentials',
        client_id: conn.secrets.clientId,
        client_secret: conn.secrets.clientSecret,
      },
    });
    const classified = classifyResponse(res, what);
    if (classified.kind !== 'delivered') return { ok: false, result: classified, status: res.status };
    let body: unknown;
    try {
      body = JSON.parse(res.text);
    } catch {
      body = undefined;
    }
    const parsed = tokenResponse.safeParse(body);
    if (!parsed.success) {
      return { ok: false, result: { kind: 'permanent', error: `${what}: the response carries no access_token` } };
    }
    const { access_token: token, expires_in: expiresInS } = parsed.data;
    const ttlMs = ((expiresInS ?? 0) - EXPIRY_MARGIN_S) * 1000;
    if (ttlMs > 0) ctx.cache.set(tokenCacheKey(conn), token, ttlMs);
    return expiresInS === undefined ? { ok: true, token } : { ok: true, token, expiresInS };
  } catch (err) {
    return { ok: false, result: classifyOutboundError(err, what) as NotDelivered };
  }
}

async function cachedToken(conn: Conn, ctx: AdapterContext): Promise<TokenResult> {
  const token = ctx.cache.get<string>(tokenCacheKey(conn));
  return token ? { ok: true, token } : requestToken(conn, ctx);
}

/** A PUT with the bearer token; a 401 means the token was revoked or expired early, so one fresh token is tried. */
async function put(conn: Conn, ctx: AdapterContext, path: string, json: unknown, what: string): Promise<ReportResult> {
  const send = (token: string) =>
    ctx.http.request(apiUrl(conn.config, path), { method: 'PUT', headers: { authorization: `Bearer ${token}` }, json });
  try {
    let token = await cachedToken(conn, ctx);
    if (!token.ok) return token.result;
    let res = await send(token.token);
    if (res.status === 401) {
      ctx.cache.delete(tokenCacheKey(conn));
      token = await requestToken(conn, ctx);
      if (!token.ok) return token.result;
      res = await send(token.token);
    }
    return classifyResponse(res, what);
  } catch (err) {
    return classifyOutboundError(err, what);
  }
}

const DONE: Record<StoredTicket['action'], { done: string; verb: string; noun: string }> = {
  erase: { done: 'Personal data deleted', verb: 'delete', noun: 'Deletion' },
  suppress: { done: 'Processing of personal data suppressed', verb: 'suppress', noun: 'Suppression' },
  unsuppress: { done: 'Suppression of personal data lifted', verb: 'unsuppress', noun: 'Lifting the suppression' },
  // OneTrust sends no holds today (its request types map to the three above); kept so every action has its words.
  hold: { done: 'Placed on legal hold', verb: 'hold', noun: 'Placing the legal hold' },
  release_hold: { done: 'Legal hold released', verb: 'release', noun: 'Releasing the legal hold' },
};

/**
 * The one text OneTrust shows for an outcome: the status comment and the request comment alike. A report after a
 * retry says which earlier failure report it supersedes.
 */
export function commentFor(ticket: StoredTicket, outcome: TicketOutcome): string {
  const proof = `Audit record ${outcome.auditRecordId} (request ${outcome.requestId}).`;
  const supersedes = ticket.supersedes
    ? ` This supersedes the earlier report of a failure (audit record ${ticket.supersedes}).`
    : '';
  const words = DONE[ticket.action];
  switch (outcome.outcome) {
    case 'not_found':
      return `No personal data found for this subject; nothing to ${words.verb}. ${proof}${supersedes}`;
    case 'failed':
      return `${words.noun} by dsr-connector failed (error code ${outcome.errorCode ?? 'unknown'}). ${proof}${supersedes}`;
    default:
      return `${words.done} by dsr-connector. ${proof}${supersedes}`;
  }
}

export async function reportOutcome(
  ticket: StoredTicket,
  outcome: TicketOutcome,
  conn: Conn,
  ctx: AdapterContext,
): Promise<ReportResult> {
  const upstream = storedUpstream.safeParse(ticket.upstream);
  if (!upstream.success) return { kind: 'permanent', error: 'OneTrust: the stored ticket has no requestQueueRefId' };
  const { requestQueueRefId, subTaskId } = upstream.data;
  const comment = commentFor(ticket, outcome);
  if (subTaskId) {
    const status = outcome.outcome === 'failed' ? 'FAILED' : 'COMPLETED';
    const result = await put(conn, ctx, subtaskStatusPath(subTaskId), { status, comment }, 'OneTrust subtask status');
    if (result.kind !== 'delivered' || !conn.config.internalComment) return result;
  }
  // Without a subtask the comment is the only trace we can leave. When it fails after the status was set, the retry
  // repeats the status PUT too, which merely sets the same status again.
  const body = { comment, internalComment: true };
  return put(conn, ctx, requestCommentsPath(requestQueueRefId), body, 'OneTrust request comment');
}
