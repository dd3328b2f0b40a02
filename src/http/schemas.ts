import { z } from '@hono/zod-openapi';

export const ErrorBody = z
  .object({
    error: z.object({
      code: z.string().openapi({ example: 'validation_failed' }),
      message: z.string(),
      requestId: z.string(),
      details: z.array(z.object({ path: z.string(), message: z.string() })).optional(),
    }),
  })
  .openapi('Error');

const err = (description: string) => ({ description, content: { 'application/json': { schema: ErrorBody } } });

/** The error responses every authenticated JSON route can give. */
export const commonErrors = {
  400: err('Invalid input; `details` names the fields'),
  401: err('Missing or invalid API key or session; `reauth_required` when a sensitive action needs the password again'),
  403: err('API key of the wrong scope, or a session mutation without its CSRF token'),
  413: err('Body too large'),
  415: err('Body is not JSON'),
  503: err('Database temporarily unavailable; retry after the Retry-After seconds'),
} as const;

export const conflictError = (description: string) => ({ 409: err(description) }) as const;

export const notFoundError = { 404: err('Not found (or not in this workspace)') } as const;

export const Pagination = z.object({
  limit: z.coerce.number().int().min(1).max(100).default(50).openapi({ param: { name: 'limit', in: 'query' } }),
  cursor: z.string().max(200).optional().openapi({ param: { name: 'cursor', in: 'query' } }),
});

/**
 * The query of a listing that takes no parameters: any parameter is refused, naming it, as on the filtered listings
 * (a filter a client believes exists, e.g. `?vendor=`, must not silently list everything).
 */
export const NoQuery = z.object({}).strict();
