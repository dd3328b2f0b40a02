import { createRoute, z } from '@hono/zod-openapi';
import type { Context } from 'hono';
import { passwordSchema, setPassword } from '../accounts/admins.ts';
import { login, logout, reauthenticate, type SessionInfo } from '../accounts/sessions.ts';
import {
  clearSessionCookie,
  clientAddress,
  CSRF_HEADER,
  requireRecentAuth,
  sessionPrincipal,
  setSessionCookie,
} from './auth.ts';
import type { App, AppDeps, AppEnv } from './env.ts';
import { commonErrors, ErrorBody } from './schemas.ts';

const SessionView = z
  .object({
    sessionId: z.string(),
    admin: z.object({ id: z.string(), email: z.string(), workspaceId: z.string() }),
    csrfToken: z.string().openapi({ description: `Send it as ${CSRF_HEADER} on every POST/PUT/PATCH/DELETE` }),
    authenticatedAt: z.string().openapi({ description: 'Last login or re-authentication' }),
    recentAuthUntil: z.string().openapi({ description: 'Sensitive actions work until then without re-authenticating' }),
    idleExpiresAt: z.string(),
    expiresAt: z.string(),
  })
  .openapi('Session');

const LoginInput = z
  .object({
    workspaceId: z.string().min(1).max(100),
    email: z.string().min(1).max(320),
    password: z.string().min(1).max(1024),
  })
  .strict()
  .openapi('LoginInput');

const json = <T extends z.ZodType>(schema: T, description: string) => ({
  description,
  content: { 'application/json': { schema } },
});
const body = <T extends z.ZodType>(schema: T) => ({ required: true, content: { 'application/json': { schema } } });
const sessionSecurity: Record<string, string[]>[] = [{ session: [] }];
const throttledError = { 429: json(ErrorBody, 'Too many password attempts; Retry-After says when to try again') };

function sessionView(deps: AppDeps, s: SessionInfo): z.infer<typeof SessionView> {
  return {
    sessionId: s.sessionId,
    admin: { id: s.adminId, email: s.email, workspaceId: s.workspaceId },
    csrfToken: s.csrfToken,
    authenticatedAt: s.authenticatedAt.toISOString(),
    recentAuthUntil: new Date(s.authenticatedAt.getTime() + deps.auth.recentAuthMs).toISOString(),
    idleExpiresAt: s.idleExpiresAt.toISOString(),
    expiresAt: s.expiresAt.toISOString(),
  };
}

/** Dashboard login, session, re-authentication, logout and password change. */
export function registerSessionRoutes(app: App, deps: AppDeps): void {
  const session = (c: Context<AppEnv>) => sessionPrincipal(deps, c);

  app.openapi(
    createRoute({
      method: 'post',
      path: '/v1/auth/login',
      summary: 'Log in as a workspace admin; sets the HttpOnly session cookie',
      tags: ['auth'],
      request: { body: body(LoginInput) },
      responses: {
        200: json(SessionView, 'Logged in'),
        ...commonErrors,
        401: json(ErrorBody, 'invalid_credentials: the same answer for an unknown workspace, email or wrong password'),
        ...throttledError,
      },
    }),
    async (c) => {
      const input = c.req.valid('json');
      const { token, session: s } = await login(deps, { ...input, address: clientAddress(deps, c) });
      setSessionCookie(deps, c, token, s.expiresAt);
      deps.logger.info({ adminId: s.adminId, sessionId: s.sessionId }, 'admin logged in');
      return c.json(sessionView(deps, s), 200);
    },
  );

  app.openapi(
    createRoute({
      method: 'get',
      path: '/v1/auth/session',
      summary: 'The current session (and its CSRF token)',
      tags: ['auth'],
      security: sessionSecurity,
      responses: { 200: json(SessionView, 'The session'), ...commonErrors },
    }),
    async (c) => c.json(sessionView(deps, await session(c)), 200),
  );

  app.openapi(
    createRoute({
      method: 'post',
      path: '/v1/auth/reauth',
      summary: 'Enter the password again to allow sensitive actions for the next 15 minutes',
      tags: ['auth'],
      security: sessionSecurity,
      request: { body: body(z.object({ password: z.string().min(1).max(1024) }).strict().openapi('ReauthInput')) },
      responses: { 200: json(SessionView, 'Re-authenticated'), ...commonErrors, ...throttledError },
    }),
    async (c) => {
      const s = await session(c);
      const fresh = await reauthenticate(deps, s, { password: c.req.valid('json').password, address: clientAddress(deps, c) }, s.token);
      deps.logger.info({ adminId: s.adminId, sessionId: s.sessionId }, 'admin re-authenticated');
      return c.json(sessionView(deps, fresh), 200);
    },
  );

  app.openapi(
    createRoute({
      method: 'post',
      path: '/v1/auth/logout',
      summary: 'End the session',
      tags: ['auth'],
      security: sessionSecurity,
      responses: { 204: { description: 'Logged out' }, ...commonErrors },
    }),
    async (c) => {
      const s = await session(c);
      await logout(deps.db, s.sessionId);
      clearSessionCookie(deps, c);
      deps.logger.info({ adminId: s.adminId, sessionId: s.sessionId }, 'admin logged out');
      return c.body(null, 204);
    },
  );

  app.openapi(
    createRoute({
      method: 'post',
      path: '/v1/auth/password',
      summary: "Change the admin's password (recent authentication); ends the admin's other sessions",
      tags: ['auth'],
      security: sessionSecurity,
      request: { body: body(z.object({ newPassword: passwordSchema }).strict().openapi('PasswordChangeInput')) },
      responses: { 204: { description: 'Changed' }, ...commonErrors },
    }),
    async (c) => {
      const s = await session(c);
      requireRecentAuth(deps, s);
      await setPassword(deps.db, s.adminId, c.req.valid('json').newPassword, s.sessionId);
      deps.logger.info({ adminId: s.adminId }, 'admin password changed');
      return c.body(null, 204);
    },
  );
}
