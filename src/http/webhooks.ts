import { z } from '@hono/zod-openapi';
import {
  WebhookAuthError,
  WebhookPayloadError,
  WebhookUnavailableError,
  type RawWebhook,
} from '../../connectors/types.ts';
import { VENDORS } from '../db/schema/index.ts';
import { ApiError } from '../lib/errors.ts';
import { IntakeContentionError } from '../privacy/intake.ts';
import { adapterContext, StaleConnectorError, verifyWebhook, type WebhookConnector } from '../upstream/store.ts';
import { receiveTickets } from '../upstream/tickets.ts';
import type { App, AppDeps } from './env.ts';
import { ErrorBody } from './schemas.ts';

const WebhookAnswer = z
  .object({
    received: z.array(z.object({ ticketId: z.string(), requestId: z.string() })),
  })
  .openapi('WebhookAnswer');

/** Turns an adapter's verdict into our error shape; the messages are PII-free by the adapter contract. */
function toApiError(err: unknown): unknown {
  if (err instanceof WebhookAuthError) return new ApiError('unauthorized', `webhook not verified: ${err.message}`);
  if (err instanceof WebhookUnavailableError) return new ApiError('service_unavailable', err.message);
  if (err instanceof WebhookPayloadError) return new ApiError(err.code, err.message, err.details);
  if (err instanceof IntakeContentionError) return err.toApiError();
  return err;
}

/**
 * `POST /webhooks/:vendor/:connectorId`: verify the sender with the connector's secrets, parse, store the tickets
 * and their requests, and only then answer 200. Unknown, disabled, deleted and vendor-mismatched connectors all get
 * the same 404, so the URL space reveals nothing.
 */
export function registerWebhookRoutes(app: App, deps: AppDeps): void {
  app.openAPIRegistry.registerPath({
    method: 'post',
    path: '/webhooks/{vendor}/{connectorId}',
    summary: 'Receive a DSR ticket from a privacy platform (verified with the connector secrets)',
    tags: ['webhooks'],
    request: {
      params: z.object({ vendor: z.enum(VENDORS), connectorId: z.string() }),
      body: { content: { 'application/json': { schema: z.object({}).passthrough() } } },
    },
    responses: {
      200: { description: 'Stored (or already stored): the ticket and its request id', content: { 'application/json': { schema: WebhookAnswer } } },
      ...Object.fromEntries(
        [
          [400, 'Malformed body, missing field, or an action not implemented'],
          [401, 'Sender not verified'],
          [404, 'No such connector'],
          [409, 'The ticket id was already used for a different request'],
          [413, 'Body too large'],
          [415, 'Body is not JSON'],
          [422, 'Request type not mapped to an action'],
          [
            503,
            'Retry after Retry-After: cannot verify right now (vendor key unreachable), database unavailable, or intake_contention (a conflicting request for the same subject kept finishing meanwhile; nothing was stored)',
          ],
        ].map(([s, d]) => [s, { description: d as string, content: { 'application/json': { schema: ErrorBody } } }]),
      ),
    },
  });

  app.post('/webhooks/:vendor/:connectorId', async (c) => {
    const { vendor, connectorId } = c.req.param();
    const connectors = deps.webhookConnectors;
    const cached = connectors.cached(vendor, connectorId);
    const connector = cached ?? (await connectors.load(vendor, connectorId));
    if (!connector) throw new ApiError('not_found', 'no such webhook');
    const req: RawWebhook = { rawBody: await c.req.text(), header: (n) => c.req.header(n), receivedAt: new Date() };
    // The connector that decided (the kept copy, or the reloaded one); its logger is made only when something is logged.
    let decider = connector;
    const log = () =>
      deps.logger.child({ requestId: c.get('requestId'), connectorId: decider.row.id, vendor: decider.row.vendor });
    const handle = async (conn: WebhookConnector): Promise<Response> => {
      decider = conn;
      const { adapter, row, version } = conn;
      const { verified, instance, previous } = await verifyWebhook(conn, req, adapterContext(deps));
      if (previous) {
        // The vendor still uses the secret the admin replaced: worth knowing before the window ends. Names only.
        log().info(
          { secretNames: previous, previousUntil: conn.previous?.expiresAt.toISOString() },
          'webhook verified with a previous inbound secret',
        );
      }
      const parsed = adapter.parse(req, instance, verified);
      if (parsed.kind === 'health_check') {
        // Nothing is stored, so nothing else would notice a kept copy of a connector since deleted, disabled or
        // changed: read it again (health checks are rare).
        if (conn === cached) {
          const current = await connectors.load(vendor, connectorId);
          if (!current) throw new ApiError('not_found', 'no such webhook');
          if (current.version !== conn.version) return handle(current);
        }
        log().info('health check answered');
        return c.json({ received: [] }, 200);
      }
      const received = await receiveTickets(deps, { id: row.id, workspaceId: row.workspaceId, version, laterOutcome: adapter.laterOutcome }, parsed.tickets, verified, req.rawBody);
      return c.json({ received: received.map((r) => ({ ticketId: r.ticketId, requestId: r.requestId })) }, 200);
    };
    try {
      try {
        return await handle(connector);
      } catch (err) {
        // A copy kept from an earlier webhook may be out of date (secrets replaced, config changed, disabled): when it
        // refused this one, could not verify it (a wrong API key or vendor URL the admin has since fixed) or could not
        // store it, read the connector again and, if it changed, decide again.
        const mayBeStale = err instanceof StaleConnectorError || (cached && isAdapterVerdict(err));
        if (!mayBeStale) throw err;
        const current = await connectors.load(vendor, connectorId);
        if (!current) throw new ApiError('not_found', 'no such webhook');
        if (current.version === connector.version) throw err;
        return await handle(current);
      }
    } catch (err) {
      if (err instanceof StaleConnectorError) {
        // Changed twice while one webhook was handled: the sender will retry.
        c.header('Retry-After', '5');
        throw new ApiError('service_unavailable', 'the connector changed while this webhook was handled; retry');
      }
      const mapped = toApiError(err);
      if (mapped instanceof ApiError && mapped.status < 500) log().warn({ code: mapped.code, reason: mapped.message }, 'webhook refused');
      if (mapped instanceof ApiError && mapped.code === 'intake_contention') {
        log().warn({ code: mapped.code }, 'webhook not stored: a conflicting request kept finishing; the vendor is asked to retry');
      }
      if (mapped instanceof ApiError && mapped.code === 'service_unavailable') {
        log().warn({ reason: mapped.message }, 'webhook could not be verified now');
        c.header('Retry-After', '30');
      }
      throw mapped;
    }
  });
}

/**
 * The adapter's own refusals (signature, payload) and its failures to verify at all (the vendor's signing key out of
 * reach with the credentials or URL it has): what a copy with old secrets or config could get wrong.
 */
function isAdapterVerdict(err: unknown): boolean {
  return err instanceof WebhookAuthError || err instanceof WebhookPayloadError || err instanceof WebhookUnavailableError;
}
