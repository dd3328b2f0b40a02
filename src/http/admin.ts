import { createRoute, z } from '@hono/zod-openapi';
import { VENDORS } from '../db/schema/index.ts';
import {
  createConnector,
  deleteConnector,
  endPreviousSecrets,
  getConnector,
  listConnectors,
  replaceSecrets,
  testConnector,
  updateConnector,
  MAX_KEEP_PREVIOUS_SECONDS,
  type ConnectorWithStatus,
} from '../upstream/store.ts';
import { pollIntervalOf } from '../upstream/poll.ts';
import { bearerSecurity, requireActor, requireRecentAuth } from './auth.ts';
import type { App, AppDeps } from './env.ts';
import type { Principal } from './auth.ts';
import { commonErrors, ErrorBody, NoQuery, notFoundError } from './schemas.ts';
import { redeliverTicket } from '../upstream/report.ts';

const PollStatusView = z
  .object({
    lastStartedAt: z.string().nullable().openapi({ description: 'When the last poll started (later than both outcomes while one runs)' }),
    lastSucceededAt: z.string().nullable(),
    lastFailure: z
      .object({
        at: z.string(),
        code: z.string().openapi({ example: 'upstream_http_error' }),
        message: z.string().openapi({ example: 'Transcend pending-requests ERASURE: HTTP 503' }),
      })
      .nullable()
      .openapi({ description: 'The last failed attempt, kept after a success for the record; no personal data, no secret' }),
    consecutiveFailures: z.number().int().openapi({ description: 'Failed attempts since the last success: 0 when the last poll succeeded' }),
    nextPollDueAt: z
      .string()
      .nullable()
      .openapi({ description: 'When the interval since the last poll is over (null: disabled, or never scheduled yet); a failed attempt is retried sooner' }),
  })
  .openapi('ConnectorPollStatus');
export type PollStatus = z.infer<typeof PollStatusView>;

const ConnectorView = z
  .object({
    id: z.string().openapi({ example: 'con_mf3k2x9a1b2c3d4e5f6g7h8i9j0k' }),
    vendor: z.enum(VENDORS),
    name: z.string(),
    enabled: z.boolean(),
    config: z.record(z.string(), z.unknown()),
    secrets: z
      .record(
        z.string(),
        z.object({
          set: z.literal(true),
          fingerprint: z.string(),
          previous: z
            .object({ fingerprint: z.string(), expiresAt: z.string() })
            .optional()
            .openapi({
              description:
                'An inbound secret replaced with keepPreviousForSeconds that still verifies webhooks until expiresAt ' +
                '(its fingerprint; never the value). Absent once the window has ended',
            }),
        }),
      )
      .openapi({ description: 'Which secrets are set, with a short keyed fingerprint; never the values' }),
    webhookPath: z.string().openapi({ example: '/webhooks/transcend/con_mf3k2x9a1b2c3d4e5f6g7h8i9j0k' }),
    webhookUrl: z.string().nullable().openapi({ description: 'Full URL when PUBLIC_BASE_URL is configured' }),
    createdAt: z.string(),
    updatedAt: z.string(),
    secretsRotatedAt: z.string(),
    pollStatus: PollStatusView.nullable().openapi({ description: 'Pull mode only (null otherwise): how the scheduled polls went' }),
  })
  .openapi('Connector');

const ConnectorInput = z
  .object({
    vendor: z.enum(VENDORS),
    name: z.string().min(1).max(200),
    config: z.record(z.string(), z.unknown()).optional().openapi({ description: "Non-secret settings (the vendor's schema)" }),
    secrets: z.record(z.string(), z.unknown()).openapi({ description: 'Write-only: API keys, shared secrets' }),
  })
  .strict()
  .openapi('ConnectorInput');

const ConnectorPatch = z
  .object({
    name: z.string().min(1).max(200).optional(),
    config: z.record(z.string(), z.unknown()).optional().openapi({ description: 'Replaces the whole config' }),
    enabled: z.boolean().optional(),
  })
  .strict()
  .openapi('ConnectorPatch');

const SecretsInput = z
  .object({
    secrets: z.record(z.string(), z.unknown()).openapi({ description: 'Replaces every secret' }),
    keepPreviousForSeconds: z
      .number()
      .int()
      .min(0)
      .max(MAX_KEEP_PREVIOUS_SECONDS)
      .optional()
      .openapi({
        description:
          'Keep the inbound secrets this changes (OneTrust inboundSecret, DataGrail webhookSecret) valid beside the new ' +
          'ones for this many seconds (at most 604800, seven days), so webhooks the vendor signs with the old one ' +
          'meanwhile are accepted. Replaces any earlier window; 0, the default, ends the old ones at once',
        example: 86400,
      }),
  })
  .strict()
  .openapi('ConnectorSecrets');

const TestResultView = z
  .object({
    ok: z.boolean(),
    checks: z.array(
      z.object({
        name: z.string(),
        ok: z.boolean(),
        detail: z.string(),
        skipped: z
          .literal(true)
          .optional()
          .openapi({ description: 'Not checked: nothing this server can call proves it (a note, never a failure)' }),
      }),
    ),
  })
  .openapi('ConnectorTestResult');

const json = <T extends z.ZodType>(schema: T, description: string) => ({
  description,
  content: { 'application/json': { schema } },
});
const body = <T extends z.ZodType>(schema: T) => ({ required: true, content: { 'application/json': { schema } } });
const idParam = { params: z.object({ id: z.string().max(100) }) };
const route = <M extends 'get' | 'post' | 'patch' | 'put' | 'delete', P extends string>(method: M, path: P, summary: string) => ({
  method,
  path,
  summary,
  tags: ['admin'],
  security: bearerSecurity,
});

/** Pull mode's health as admins see it; null for a connector that is not in pull mode. */
function pollStatusView(row: ConnectorWithStatus): z.infer<typeof PollStatusView> | null {
  const minutes = pollIntervalOf(row);
  if (minutes === null) return null;
  const s = row.pollStatus;
  const iso = (d: Date | null | undefined) => d?.toISOString() ?? null;
  return {
    lastStartedAt: iso(s?.lastStartedAt),
    lastSucceededAt: iso(s?.lastSucceededAt),
    lastFailure:
      s?.lastFailedAt && s.lastErrorCode
        ? { at: s.lastFailedAt.toISOString(), code: s.lastErrorCode, message: s.lastErrorMessage ?? '' }
        : null,
    consecutiveFailures: s?.consecutiveFailures ?? 0,
    // What the connectors tick goes by: the interval runs from when the last poll was scheduled or succeeded.
    nextPollDueAt: row.enabled && row.lastPolledAt ? new Date(row.lastPolledAt.getTime() + minutes * 60_000).toISOString() : null,
  };
}

export function connectorView(deps: AppDeps, row: ConnectorWithStatus): z.infer<typeof ConnectorView> {
  const webhookPath = `/webhooks/${row.vendor}/${row.id}`;
  // Previous inbound secrets are shown while they still verify webhooks: their window ends on the clock.
  const until = row.previousSecretsExpireAt;
  const previous = until && until.getTime() > Date.now() ? row.previousSecretFingerprints : {};
  return {
    id: row.id,
    vendor: row.vendor,
    name: row.name,
    enabled: row.enabled,
    config: row.config,
    secrets: Object.fromEntries(
      Object.entries(row.secretFingerprints).map(([name, fingerprint]) => {
        const old = Object.hasOwn(previous, name) ? previous[name] : undefined;
        return [
          name,
          old === undefined
            ? { set: true as const, fingerprint }
            : { set: true as const, fingerprint, previous: { fingerprint: old, expiresAt: until!.toISOString() } },
        ];
      }),
    ),
    webhookPath,
    webhookUrl: deps.publicBaseUrl ? `${deps.publicBaseUrl.replace(/\/+$/, '')}${webhookPath}` : null,
    createdAt: row.createdAt.toISOString(),
    updatedAt: row.updatedAt.toISOString(),
    secretsRotatedAt: row.secretsRotatedAt.toISOString(),
    pollStatus: pollStatusView(row),
  };
}

/** Connector administration for the workspace of the admin key; secrets go in and never come out. */
export function registerAdminRoutes(app: App, deps: AppDeps): void {
  app.use('/v1/admin/*', requireActor(deps, 'admin'));
  // Credential changes and deletion by a person need the password entered within the last 15 minutes.
  const recent = (c: { get(k: 'auth'): Principal }) => requireRecentAuth(deps, c.get('auth'));
  const ws = (c: { get(k: 'auth'): { workspaceId: string } }) => c.get('auth').workspaceId;
  const one = { 200: json(ConnectorView, 'The connector'), ...commonErrors, ...notFoundError };

  app.openapi(
    createRoute({
      ...route('post', '/v1/admin/connectors', 'Create a connector'),
      request: { body: body(ConnectorInput) },
      responses: { 201: json(ConnectorView, 'Created'), ...commonErrors },
    }),
    async (c) => {
      recent(c);
      return c.json(connectorView(deps, await createConnector(deps, ws(c), c.req.valid('json'))), 201);
    },
  );

  app.openapi(
    createRoute({
      ...route('get', '/v1/admin/connectors', "The workspace's connectors"),
      request: { query: NoQuery },
      responses: { 200: json(z.object({ data: z.array(ConnectorView) }), 'All connectors'), ...commonErrors },
    }),
    async (c) => c.json({ data: (await listConnectors(deps.db, ws(c))).map((r) => connectorView(deps, r)) }, 200),
  );

  app.openapi(
    createRoute({ ...route('get', '/v1/admin/connectors/{id}', 'One connector'), request: idParam, responses: one }),
    async (c) => c.json(connectorView(deps, await getConnector(deps.db, ws(c), c.req.valid('param').id)), 200),
  );

  app.openapi(
    createRoute({
      ...route('patch', '/v1/admin/connectors/{id}', 'Rename, replace the config (recent authentication), enable or disable'),
      request: { ...idParam, body: body(ConnectorPatch) },
      responses: one,
    }),
    async (c) => {
      const patch = c.req.valid('json');
      // The config says where secrets and nonces are sent (base URLs, callback hosts): as sensitive as the secrets.
      if (patch.config !== undefined) recent(c);
      return c.json(connectorView(deps, await updateConnector(deps, ws(c), c.req.valid('param').id, patch)), 200);
    },
  );

  app.openapi(
    createRoute({
      ...route('put', '/v1/admin/connectors/{id}/secrets', 'Replace the secrets'),
      request: { ...idParam, body: body(SecretsInput) },
      responses: one,
    }),
    async (c) => {
      recent(c);
      return c.json(connectorView(deps, await replaceSecrets(deps, ws(c), c.req.valid('param').id, c.req.valid('json'))), 200);
    },
  );

  app.openapi(
    createRoute({
      ...route('delete', '/v1/admin/connectors/{id}/secrets/previous', 'End the grace period of replaced inbound secrets now'),
      description:
        'The inbound secrets kept by a secrets PUT with keepPreviousForSeconds stop verifying webhooks at once (e.g. ' +
        'the old secret leaked); the current secrets stay. Answers the connector, also when nothing was kept.',
      request: idParam,
      responses: one,
    }),
    async (c) => c.json(connectorView(deps, await endPreviousSecrets(deps, ws(c), c.req.valid('param').id)), 200),
  );

  for (const [action, enabled] of [
    ['disable', false],
    ['enable', true],
  ] as const) {
    app.openapi(
      createRoute({
        ...route('post', `/v1/admin/connectors/{id}/${action}`, `${action === 'disable' ? 'Disable' : 'Enable'} a connector`),
        request: idParam,
        responses: one,
      }),
      async (c) => c.json(connectorView(deps, await updateConnector(deps, ws(c), c.req.valid('param').id, { enabled })), 200),
    );
  }

  app.openapi(
    createRoute({
      ...route('delete', '/v1/admin/connectors/{id}', 'Delete a connector (its secrets are wiped)'),
      request: idParam,
      responses: { 204: { description: 'Deleted' }, ...commonErrors, ...notFoundError },
    }),
    async (c) => {
      recent(c);
      await deleteConnector(deps, ws(c), c.req.valid('param').id);
      return c.body(null, 204);
    },
  );

  app.openapi(
    createRoute({
      ...route('post', '/v1/admin/tickets/{id}/redeliver', 'Deliver a failed report again (fresh attempt budget)'),
      request: idParam,
      responses: {
        202: json(z.object({ ticketId: z.string(), status: z.literal('pending') }), 'Queued again'),
        ...commonErrors,
        ...notFoundError,
        409: json(ErrorBody, 'The report is not failed (pending or already delivered), or its connector was deleted'),
      },
    }),
    async (c) => {
      const t = await redeliverTicket(deps, ws(c), c.req.valid('param').id);
      return c.json({ ticketId: t.id, status: 'pending' as const }, 202);
    },
  );

  app.openapi(
    createRoute({
      ...route('post', '/v1/admin/connectors/{id}/test', 'Check the credentials against the vendor'),
      request: idParam,
      responses: { 200: json(TestResultView, 'What was checked and how it went'), ...commonErrors, ...notFoundError },
    }),
    async (c) => {
      const row = await getConnector(deps.db, ws(c), c.req.valid('param').id);
      const result = await testConnector(deps, row);
      deps.logger.info({ connectorId: row.id, vendor: row.vendor, ok: result.ok }, 'connector tested');
      return c.json(result, 200);
    },
  );
}
