import { createRoute, z } from '@hono/zod-openapi';
import { adminView, createAdmin, disableAdmin, listAdmins, passwordSchema } from '../accounts/admins.ts';
import { createApiKey, keyView, listApiKeys, regenerateApiKey, revokeApiKey } from '../accounts/keys.ts';
import { API_KEY_SCOPES } from '../db/schema/index.ts';
import { verifyWorkspaceChain } from '../privacy/audit-chain.ts';
import { bearerSecurity, requireRecentAuth, type Principal } from './auth.ts';
import type { App, AppDeps } from './env.ts';
import { commonErrors, ErrorBody, NoQuery, notFoundError } from './schemas.ts';

const KeyView = z
  .object({
    id: z.string(),
    scope: z.enum(API_KEY_SCOPES),
    prefix: z.string().openapi({ description: 'First characters of the key, to tell keys apart' }),
    createdAt: z.string(),
    lastUsedAt: z.string().nullable().openapi({ description: 'Updated at most once a minute' }),
    revokedAt: z.string().nullable(),
  })
  .openapi('ApiKey');

const NewKeyView = KeyView.extend({
  key: z.string().openapi({ description: 'The key itself: shown this once, only its hash is stored' }),
}).openapi('NewApiKey');

const AdminView = z
  .object({
    id: z.string(),
    workspaceId: z.string(),
    email: z.string(),
    createdAt: z.string(),
    passwordChangedAt: z.string(),
    disabledAt: z.string().nullable(),
  })
  .openapi('Admin');

const ChainReportView = z
  .object({
    workspaceId: z.string(),
    ok: z.boolean(),
    records: z.number().int(),
    head: z
      .object({ position: z.number().int(), hash: z.string(), recordId: z.string() })
      .nullable()
      .openapi({ description: 'the last record: keep its hash, and later check GET /v1/privacy/audit/{recordId} still shows it' }),
    legacyRecords: z.number().int(),
    firstBreak: z
      .object({
        problem: z.string(),
        position: z.number().int().nullable(),
        recordId: z.string().nullable(),
        detail: z.string(),
      })
      .nullable(),
  })
  .openapi('AuditChainReport');

const json = <T extends z.ZodType>(schema: T, description: string) => ({
  description,
  content: { 'application/json': { schema } },
});
const body = <T extends z.ZodType>(schema: T) => ({ required: true, content: { 'application/json': { schema } } });
const idParam = { params: z.object({ id: z.string().max(100) }) };
const route = <M extends 'get' | 'post', P extends string>(method: M, path: P, summary: string) => ({
  method,
  path,
  summary,
  tags: ['admin'],
  security: bearerSecurity,
});
const conflict = { 409: json(ErrorBody, 'Already revoked / already exists') };

/** API keys, admins and the audit chain check, for the workspace of the caller (admin key or admin session). */
export function registerAccountRoutes(app: App, deps: AppDeps): void {
  const ws = (c: { get(k: 'auth'): Principal }) => c.get('auth').workspaceId;
  const recent = (c: { get(k: 'auth'): Principal }) => requireRecentAuth(deps, c.get('auth'));
  const newKey = (created: Awaited<ReturnType<typeof createApiKey>>) => ({ ...keyView(created.row), key: created.key });

  app.openapi(
    createRoute({
      ...route('get', '/v1/admin/keys', "The workspace's API keys (never the keys themselves)"),
      request: { query: NoQuery },
      responses: { 200: json(z.object({ data: z.array(KeyView) }), 'All keys, revoked ones included'), ...commonErrors },
    }),
    async (c) => c.json({ data: (await listApiKeys(deps.db, ws(c))).map(keyView) }, 200),
  );

  app.openapi(
    createRoute({
      ...route('post', '/v1/admin/keys', 'Create an API key (recent authentication)'),
      request: { body: body(z.object({ scope: z.enum(API_KEY_SCOPES) }).strict().openapi('ApiKeyInput')) },
      responses: { 201: json(NewKeyView, 'Created; the key is shown once'), ...commonErrors },
    }),
    async (c) => {
      recent(c);
      const created = await createApiKey(deps.db, ws(c), c.req.valid('json').scope);
      deps.logger.info({ keyId: created.id, scope: created.row.scope }, 'api key created');
      return c.json(newKey(created), 201);
    },
  );

  app.openapi(
    createRoute({
      ...route('post', '/v1/admin/keys/{id}/revoke', 'Revoke an API key; it fails at once'),
      request: idParam,
      responses: { 200: json(KeyView, 'Revoked'), ...commonErrors, ...notFoundError, ...conflict },
    }),
    async (c) => {
      const row = await revokeApiKey(deps.db, ws(c), c.req.valid('param').id);
      deps.logger.info({ keyId: row.id }, 'api key revoked');
      return c.json(keyView(row), 200);
    },
  );

  app.openapi(
    createRoute({
      ...route('post', '/v1/admin/keys/{id}/regenerate', 'Revoke a key and issue a new one of the same scope (recent authentication)'),
      request: idParam,
      responses: {
        201: json(NewKeyView.extend({ revokedKeyId: z.string() }), 'The new key, shown once'),
        ...commonErrors,
        ...notFoundError,
        ...conflict,
      },
    }),
    async (c) => {
      recent(c);
      const created = await regenerateApiKey(deps.db, ws(c), c.req.valid('param').id);
      deps.logger.info({ keyId: created.id, revokedKeyId: created.revokedKeyId }, 'api key regenerated');
      return c.json({ ...newKey(created), revokedKeyId: created.revokedKeyId }, 201);
    },
  );

  app.openapi(
    createRoute({
      ...route('get', '/v1/admin/admins', "The workspace's admins"),
      request: { query: NoQuery },
      responses: { 200: json(z.object({ data: z.array(AdminView) }), 'All admins'), ...commonErrors },
    }),
    async (c) => c.json({ data: (await listAdmins(deps.db, ws(c))).map(adminView) }, 200),
  );

  app.openapi(
    createRoute({
      ...route('post', '/v1/admin/admins', 'Add an admin (recent authentication)'),
      request: {
        body: body(z.object({ email: z.string().max(320), password: passwordSchema }).strict().openapi('AdminInput')),
      },
      responses: { 201: json(AdminView, 'Created'), ...commonErrors, ...conflict },
    }),
    async (c) => {
      recent(c);
      const admin = await createAdmin(deps.db, { workspaceId: ws(c), ...c.req.valid('json') });
      deps.logger.info({ adminId: admin.id }, 'admin created');
      return c.json(adminView(admin), 201);
    },
  );

  app.openapi(
    createRoute({
      ...route('post', '/v1/admin/admins/{id}/disable', 'Disable an admin and end their sessions (recent authentication)'),
      request: idParam,
      responses: { 200: json(AdminView, 'Disabled'), ...commonErrors, ...notFoundError },
    }),
    async (c) => {
      recent(c);
      const admin = await disableAdmin(deps.db, ws(c), c.req.valid('param').id);
      deps.logger.info({ adminId: admin.id }, 'admin disabled');
      return c.json(adminView(admin), 200);
    },
  );

  app.openapi(
    createRoute({
      ...route('get', '/v1/admin/audit/verify', "Walk the workspace's audit chain and report the first broken link"),
      responses: { 200: json(ChainReportView, 'The verification result'), ...commonErrors },
    }),
    async (c) => c.json(await verifyWorkspaceChain(deps.db, ws(c)), 200),
  );
}
