import type { Context, MiddlewareHandler } from 'hono';
import { deleteCookie, getCookie, setCookie } from 'hono/cookie';
import { authenticateKey, type AuthInfo } from '../accounts/keys.ts';
import { csrfMatches, resolveSession, type SessionInfo } from '../accounts/sessions.ts';
import type { ApiKeyScope } from '../db/schema/index.ts';
import { ApiError } from '../lib/errors.ts';
import type { Actor } from '../privacy/context.ts';
import type { AppDeps, AppEnv } from './env.ts';

/** Who is calling: a machine with an API key, or a person with a dashboard session. */
export type Principal = ({ kind: 'key' } & AuthInfo) | ({ kind: 'session'; token: string } & SessionInfo);

export const SESSION_COOKIE = 'dsr_session';
export const CSRF_HEADER = 'X-CSRF-Token';
const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS']);

async function keyPrincipal(deps: AppDeps, header: string, scope: ApiKeyScope): Promise<Principal> {
  const match = /^Bearer\s+(\S+)$/i.exec(header);
  if (!match) throw new ApiError('unauthorized', 'the Authorization header must be "Bearer <key>"');
  const auth = await authenticateKey(deps.db, match[1]!);
  if (!auth) throw new ApiError('unauthorized', 'invalid or revoked API key');
  if (auth.scope !== scope) throw new ApiError('forbidden', `this route needs ${aKey(scope)}, not ${aKey(auth.scope)}`);
  return { kind: 'key', ...auth };
}

/** "an admin key", "an ingest key", "a privacy key". */
const aKey = (scope: ApiKeyScope) => `${/^[aeiou]/.test(scope) ? 'an' : 'a'} ${scope} key`;

/** Bearer API key of the given scope only (ingest: machines, never a dashboard session). */
export function requireKey(deps: AppDeps, scope: ApiKeyScope): MiddlewareHandler<AppEnv> {
  return async (c, next) => {
    const header = c.req.header('authorization');
    if (!header) throw new ApiError('unauthorized', `missing bearer ${scope} key in the Authorization header`);
    c.set('auth', await keyPrincipal(deps, header, scope));
    await next();
  };
}

/** The live session behind the cookie, or a 401 that also clears a dead cookie. */
export async function sessionPrincipal(deps: AppDeps, c: Context<AppEnv>): Promise<Principal & { kind: 'session' }> {
  const token = getCookie(c, SESSION_COOKIE);
  if (!token) throw new ApiError('unauthorized', 'not logged in: POST /v1/auth/login first');
  const session = await resolveSession(deps, token);
  if (!session) {
    clearSessionCookie(deps, c);
    throw new ApiError('unauthorized', 'the session has expired or was ended; log in again');
  }
  // A cookie rides along on any request the browser makes; a mutation must also prove it came from our page.
  if (!SAFE_METHODS.has(c.req.method) && !csrfMatches(token, c.req.header(CSRF_HEADER))) {
    throw new ApiError('csrf_failed', `missing or wrong ${CSRF_HEADER} header (take it from the login or session response)`);
  }
  return { kind: 'session', token, ...session };
}

/**
 * An API key of the given scope (Authorization: Bearer) or an admin's dashboard session (cookie + CSRF header on
 * mutations). A bearer header, when present, decides: a request is never half one and half the other.
 */
export function requireActor(deps: AppDeps, scope: 'privacy' | 'admin'): MiddlewareHandler<AppEnv> {
  return async (c, next) => {
    const header = c.req.header('authorization');
    if (header) c.set('auth', await keyPrincipal(deps, header, scope));
    else if (getCookie(c, SESSION_COOKIE)) c.set('auth', await sessionPrincipal(deps, c));
    else throw new ApiError('unauthorized', `send a bearer ${scope} key in the Authorization header, or log in`);
    await next();
  };
}

/**
 * Sensitive actions by a person need the password presented within the last 15 minutes (login or
 * POST /v1/auth/reauth). An API key presents its whole secret on every call, so it is always "recent".
 */
export function requireRecentAuth(deps: AppDeps, p: Principal): void {
  if (p.kind !== 'session') return;
  if (Date.now() - p.authenticatedAt.getTime() <= deps.auth.recentAuthMs) return;
  throw new ApiError(
    'reauth_required',
    'this action needs a login or re-authentication within the last 15 minutes: POST /v1/auth/reauth with your password',
  );
}

export function actorOf(p: Principal): Actor {
  return p.kind === 'key'
    ? { type: 'api_key', id: p.keyId, source: 'api' }
    : { type: 'admin', id: p.adminId, source: 'dashboard' };
}

export function setSessionCookie(deps: AppDeps, c: Context<AppEnv>, token: string, expiresAt: Date): void {
  setCookie(c, SESSION_COOKIE, token, {
    httpOnly: true,
    sameSite: 'Strict',
    secure: secureCookie(deps, c),
    path: '/',
    expires: expiresAt,
  });
}

export function clearSessionCookie(deps: AppDeps, c: Context<AppEnv>): void {
  deleteCookie(c, SESSION_COOKIE, { path: '/', secure: secureCookie(deps, c), httpOnly: true, sameSite: 'Strict' });
}

/** Secure when served over https: configured so (TLS ends at a proxy), or the request itself came over https. */
function secureCookie(deps: AppDeps, c: Context<AppEnv>): boolean {
  return deps.auth.secureCookies || new URL(c.req.url).protocol === 'https:';
}

/**
 * The caller's address for the login rate limit: the runtime's view of the connection, or the first
 * X-Forwarded-For entry when TRUST_PROXY says a proxy in front sets it.
 */
export function clientAddress(deps: AppDeps, c: Context<AppEnv>): string {
  if (deps.auth.trustProxy) {
    const forwarded = c.req.header('x-forwarded-for')?.split(',')[0]?.trim();
    if (forwarded) return forwarded.slice(0, 64);
  }
  return deps.remoteAddress?.(c) ?? 'unknown';
}

export const bearerSecurity: Record<string, string[]>[] = [{ bearer: [] }, { session: [] }];
export const keyOnlySecurity: Record<string, string[]>[] = [{ bearer: [] }];
