import { OpenAPIHono } from '@hono/zod-openapi';
import type { Context } from 'hono';
import { bodyLimit } from 'hono/body-limit';
import { HTTPException } from 'hono/http-exception';
import { requestId } from 'hono/request-id';
import type { ContentfulStatusCode } from 'hono/utils/http-status';
import { ZodError } from 'zod';
import { isTransient, isUnstorableValue, pgCode, safeErrorCode, UNSTORABLE_VALUE_MESSAGE } from './db/errors.ts';
import { ApiError, ERROR_STATUS, issuesToDetails, type ErrorCode } from './lib/errors.ts';
import type { App, AppDeps, AppEnv } from './http/env.ts';
import { registerAccountRoutes } from './http/accounts.ts';
import { registerAdminRoutes } from './http/admin.ts';
import { registerHealthRoutes } from './http/health.ts';
import { registerIngestRoutes } from './http/ingest.ts';
import { registerPrivacyRoutes } from './http/privacy.ts';
import { registerSessionRoutes } from './http/sessions.ts';
import { registerWebhookRoutes } from './http/webhooks.ts';

export type { AppDeps };

const JSON_TYPE = /^application\/([\w.-]+\+)?json$/i;

function errorBody(c: Context<AppEnv>, code: ErrorCode, message: string, details?: unknown) {
  return c.json(
    { error: { code, message, requestId: c.get('requestId'), ...(details ? { details } : {}) } },
    ERROR_STATUS[code] as ContentfulStatusCode,
  );
}

/** Hono's own exceptions carry fixed messages (no request data); give each a code of ours. */
function codeForHttpException(err: HTTPException): ErrorCode {
  if (err.status === 400 && /json/i.test(err.message)) return 'malformed_json';
  const byStatus = Object.entries(ERROR_STATUS).find(([, s]) => s === err.status);
  return (byStatus?.[0] as ErrorCode | undefined) ?? (err.status >= 500 ? 'internal_error' : 'bad_request');
}

/** The methods the app's routes (not its middleware) answer on this path; HEAD wherever GET is. */
function allowedMethods(app: App, path: string): string[] {
  const methods = new Set<string>();
  for (const r of app.routes) {
    if (r.method === 'ALL' || methods.has(r.method)) continue;
    const pattern = r.path
      .split('/')
      .map((seg) => (seg.startsWith(':') ? '[^/]+' : seg === '*' ? '.*' : seg.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')))
      .join('/');
    if (new RegExp(`^${pattern}$`).test(path)) methods.add(r.method);
  }
  if (methods.has('GET')) methods.add('HEAD');
  return [...methods];
}

export function newApp(deps: AppDeps): App {
  const app: App = new OpenAPIHono<AppEnv>({
    defaultHook: (result) => {
      if (!result.success) {
        // A query parameter the route does not know (a misspelt filter) is named on its own, not as "(body)".
        const issues =
          result.target === 'query'
            ? result.error.issues.flatMap((i) =>
                i.code === 'unrecognized_keys'
                  ? i.keys.map((key) => ({ path: [...i.path, key], message: 'unknown query parameter' }))
                  : [i],
              )
            : result.error.issues;
        throw new ApiError('validation_failed', 'request failed validation', issuesToDetails(issues));
      }
    },
  });

  app.use(
    requestId({
      headerName: 'X-Request-Id',
      generator: () => crypto.randomUUID(),
      limitLength: 100,
    }),
  );
  app.use(async (c, next) => {
    const started = performance.now();
    await next();
    // Route pattern, not the URL: query strings can carry emails.
    deps.logger.info(
      {
        requestId: c.get('requestId'),
        method: c.req.method,
        route: c.req.routePath,
        status: c.res.status,
        ms: Math.round(performance.now() - started),
      },
      'http request',
    );
  });
  const tooLarge = () => new ApiError('payload_too_large', `body exceeds ${deps.bodyLimitBytes} bytes`);
  const limitStreamed = bodyLimit({
    maxSize: deps.bodyLimitBytes,
    onError: () => {
      throw tooLarge();
    },
  });
  app.use(async (c, next) => {
    // A declared length is checked as declared: the HTTP parser never reads past it. Only a body without one
    // (chunked) is counted as it streams in, by hono's bodyLimit, which reads the request as a web stream (building
    // the whole Request object, which a declared length spares every webhook). GET and HEAD bodies are never read.
    const declared = c.req.header('content-length');
    if (declared !== undefined && c.req.header('transfer-encoding') === undefined) {
      if (Number(declared) > deps.bodyLimitBytes) throw tooLarge();
      return next();
    }
    if (c.req.method === 'GET' || c.req.method === 'HEAD') return next();
    return limitStreamed(c, next);
  });
  app.use(async (c, next) => {
    const length = c.req.header('content-length');
    const hasBody = (length !== undefined && length !== '0') || c.req.header('transfer-encoding') !== undefined;
    // Action routes (e.g. POST …/disable) take no body and need no content type.
    if (hasBody && (c.req.method === 'POST' || c.req.method === 'PUT' || c.req.method === 'PATCH')) {
      const type = (c.req.header('content-type') ?? '').split(';')[0]!.trim();
      if (!JSON_TYPE.test(type)) throw new ApiError('unsupported_media_type', 'send the body as application/json');
    }
    await next();
  });

  registerHealthRoutes(app, deps);
  registerIngestRoutes(app, deps);
  registerPrivacyRoutes(app, deps);
  registerSessionRoutes(app, deps);
  registerAdminRoutes(app, deps);
  registerAccountRoutes(app, deps);
  registerWebhookRoutes(app, deps);

  app.notFound((c) => {
    // A path we serve, asked with another method: say which methods it takes rather than that it does not exist.
    const allowed = allowedMethods(app, c.req.path);
    if (allowed.length > 0 && !allowed.includes(c.req.method)) {
      c.header('Allow', allowed.join(', '));
      return errorBody(c, 'method_not_allowed', `${allowed.join(', ')} only on this route`);
    }
    return errorBody(c, 'not_found', 'no such route');
  });
  app.onError((err, c) => {
    if (err instanceof ApiError) {
      for (const [name, value] of Object.entries(err.headers ?? {})) c.header(name, value);
      return errorBody(c, err.code, err.message, err.details);
    }
    if (err instanceof HTTPException) return errorBody(c, codeForHttpException(err), err.message);
    if (err instanceof ZodError) {
      return errorBody(c, 'validation_failed', 'request failed validation', issuesToDetails(err.issues));
    }
    // Class 22 (data exception): a value the client sent that PostgreSQL cannot store, e.g. a NUL character.
    if (isUnstorableValue(err)) {
      return errorBody(c, 'validation_failed', `a value in the request ${UNSTORABLE_VALUE_MESSAGE}`);
    }
    if (isTransient(err)) {
      // drizzle wraps the driver's error: the code is on a cause (a SQLSTATE, or e.g. ECONNREFUSED).
      deps.logger.warn({ requestId: c.get('requestId'), errorCode: safeErrorCode(err) }, 'database unavailable');
      c.header('Retry-After', '5');
      return errorBody(c, 'service_unavailable', 'database temporarily unavailable; retry');
    }
    // Database messages can quote row values (and a failed query's message spans lines, parameters included): log
    // the name, SQLSTATE and the stack's own frame lines, never the message.
    const e = err as { name?: string; stack?: string };
    const frames = (e.stack ?? '').split('\n').filter((line) => /^\s+at /.test(line)).slice(0, 7).join('\n');
    deps.logger.error(
      { requestId: c.get('requestId'), err: { name: e.name, code: pgCode(err) ?? (err as { code?: unknown }).code, frames } },
      'unhandled error',
    );
    return errorBody(c, 'internal_error', 'internal error');
  });
  return app;
}
