import { createRoute, z } from '@hono/zod-openapi';
import {
  identifySchema,
  ingest,
  ingestItemSchema,
  MAX_BATCH,
  messageSchema,
  topicQuestionSchema,
  trackSchema,
  type IngestItem,
} from '../product/ingest.ts';
import { keyOnlySecurity, requireKey } from './auth.ts';
import type { App, AppDeps } from './env.ts';
import { commonErrors, conflictError } from './schemas.ts';

const IngestResult = z
  .object({
    accepted: z.literal(true),
    stored: z.boolean(),
    suppressed: z.boolean().openapi({ description: 'The user or workspace is suppressed: nothing was stored' }),
    reason: z.enum(['suppressed', 'erased']).optional(),
  })
  .openapi('IngestResult');

/** Messages name a conversation, which belongs to one end user. */
const conversationConflict = conflictError('conversationId belongs to another user (nothing is stored)');

const single = (path: string, summary: string, schema: z.ZodObject, type: IngestItem['type']) => ({
  route: createRoute({
    method: 'post',
    path,
    summary,
    tags: ['ingest'],
    security: keyOnlySecurity,
    request: { body: { required: true, content: { 'application/json': { schema } } } },
    responses: {
      200: { description: 'Accepted', content: { 'application/json': { schema: IngestResult } } },
      ...commonErrors,
      ...(type === 'message' ? conversationConflict : {}),
    },
  }),
  type,
});

const routes = [
  single('/v1/identify', 'Create or update an end-user profile', identifySchema, 'identify'),
  single('/v1/track', 'Record an activity event', trackSchema, 'track'),
  single('/v1/messages', 'Record a conversation message (user or assistant)', messageSchema, 'message'),
  single('/v1/topics/questions', 'Record a Topics-inbox question', topicQuestionSchema, 'topic_question'),
];

const batchRoute = createRoute({
  method: 'post',
  path: '/v1/batch',
  summary: `Record up to ${MAX_BATCH} items at once, in one transaction`,
  tags: ['ingest'],
  security: keyOnlySecurity,
  request: {
    body: {
      required: true,
      content: {
        'application/json': { schema: z.strictObject({ batch: z.array(ingestItemSchema).min(1).max(MAX_BATCH) }) },
      },
    },
  },
  responses: {
    200: {
      description: 'Accepted; one result per item, in order',
      content: {
        'application/json': {
          schema: z.object({ accepted: z.literal(true), results: z.array(IngestResult.omit({ accepted: true })) }),
        },
      },
    },
    ...commonErrors,
    ...conversationConflict,
  },
});

export function registerIngestRoutes(app: App, deps: AppDeps): void {
  const auth = requireKey(deps, 'ingest');
  for (const { route, type } of routes) {
    app.use(route.path, auth);
    app.openapi(route, async (c) => {
      const body = c.req.valid('json') as Omit<IngestItem, 'type'>;
      const [result] = await ingest(deps, c.get('auth').workspaceId, [{ ...body, type } as IngestItem]);
      return c.json({ accepted: true as const, ...result! }, 200);
    });
  }
  app.use(batchRoute.path, auth);
  app.openapi(batchRoute, async (c) => {
    const { batch } = c.req.valid('json');
    const results = await ingest(deps, c.get('auth').workspaceId, batch);
    return c.json({ accepted: true as const, results }, 200);
  });
}
