import type { MiddlewareHandler } from 'hono';
import { authenticateKey } from '../accounts/keys.ts';
import type { ApiKeyScope } from '../db/schema/index.ts';
import { ApiError } from '../lib/errors.ts';
import type { AppDeps, AppEnv } from './env.ts';

/** Bearer API key of the given scope; sets `auth` (key id, workspace, scope) for the route. */
export function requireKey(deps: AppDeps, scope: ApiKeyScope): MiddlewareHandler<AppEnv> {
  return async (c, next) => {
    const header = c.req.header('authorization') ?? '';
    const match = /^Bearer\s+(\S+)$/i.exec(header);
    if (!match) throw new ApiError('unauthorized', `missing bearer ${scope} key in the Authorization header`);
    const auth = await authenticateKey(deps.db, match[1]!);
    if (!auth) throw new ApiError('unauthorized', 'invalid or revoked API key');
    if (auth.scope !== scope) throw new ApiError('forbidden', `this route needs a ${scope} key, not a ${auth.scope} key`);
    c.set('auth', auth);
    await next();
  };
}

export const bearerSecurity = [{ bearer: [] as string[] }];
