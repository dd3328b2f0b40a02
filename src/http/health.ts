import { createRoute, z } from '@hono/zod-openapi';
import type { App, AppDeps } from './env.ts';

const Health = z.object({ status: z.enum(['ok', 'degraded']), database: z.enum(['ok', 'unreachable']) });

const healthRoute = createRoute({
  method: 'get',
  path: '/healthz',
  summary: 'Liveness and database reachability',
  tags: ['ops'],
  responses: {
    200: { description: 'Healthy', content: { 'application/json': { schema: Health } } },
    503: { description: 'Database unreachable', content: { 'application/json': { schema: Health } } },
  },
});

const ApiIndex = z.object({
  name: z.literal('dsr-connector'),
  docs: z.string(),
  openapi: z.string(),
  health: z.string(),
});

// The start-up banner names /v1 as the API's base: whoever opens it gets where to read on, not a 404.
const indexRoute = createRoute({
  method: 'get',
  path: '/v1',
  summary: 'Where the API is described (docs, OpenAPI document, health)',
  tags: ['ops'],
  responses: { 200: { description: 'Links', content: { 'application/json': { schema: ApiIndex } } } },
});

const HEALTH_TIMEOUT_MS = 2_000;

async function databaseReachable(deps: AppDeps): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      deps.sql`select 1`.then(() => true),
      new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), HEALTH_TIMEOUT_MS))),
    ]);
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
  }
}

// The docs page uses swagger-ui from the installed package (deps.docsAsset), so it works without reaching a CDN.
const SWAGGER_ASSETS: Record<string, string> = {
  'swagger-ui.css': 'text/css; charset=utf-8',
  'swagger-ui-bundle.js': 'text/javascript; charset=utf-8',
};

const DOCS_HTML = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dsr-connector API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>
<body><div id="ui"></div><script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script></body></html>`;
const DOCS_INIT = `window.ui = SwaggerUIBundle({ url: '/openapi.json', dom_id: '#ui' });`;

export function registerHealthRoutes(app: App, deps: AppDeps): void {
  app.openapi(indexRoute, (c) =>
    c.json({ name: 'dsr-connector' as const, docs: '/docs', openapi: '/openapi.json', health: '/healthz' }, 200),
  );
  app.openapi(healthRoute, async (c) => {
    const ok = await databaseReachable(deps);
    return ok
      ? c.json({ status: 'ok' as const, database: 'ok' as const }, 200)
      : c.json({ status: 'degraded' as const, database: 'unreachable' as const }, 503);
  });

  app.doc31('/openapi.json', {
    openapi: '3.1.0',
    info: {
      title: 'dsr-connector',
      version: '0.1.0',
      description: 'Ingest product data; erase and suppress it on request, with an immutable audit trail.',
    },
  });
  app.openAPIRegistry.registerComponent('securitySchemes', 'bearer', {
    type: 'http',
    scheme: 'bearer',
    description: 'Workspace API key: dsr_ingest_…, dsr_privacy_… or dsr_admin_…',
  });
  app.openAPIRegistry.registerComponent('securitySchemes', 'session', {
    type: 'apiKey',
    in: 'cookie',
    name: 'dsr_session',
    description:
      'Admin dashboard session from POST /v1/auth/login (privacy and admin routes). Mutations also need the X-CSRF-Token header.',
  });

  app.get('/docs', (c) => c.html(DOCS_HTML));
  app.get('/docs/init.js', (c) => c.body(DOCS_INIT, 200, { 'content-type': 'text/javascript; charset=utf-8' }));
  app.get('/docs/assets/:file', async (c) => {
    const file = c.req.param('file');
    const type = SWAGGER_ASSETS[file];
    if (!type) return c.notFound();
    const body = await deps.docsAsset?.(file);
    if (!body) return c.notFound();
    return c.body(body, 200, { 'content-type': type, 'cache-control': 'public, max-age=86400' });
  });
}
