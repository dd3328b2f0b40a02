import { HTTPException } from 'hono/http-exception';
import type { ContentfulStatusCode } from 'hono/utils/http-status';

/** Every error code the API can answer with, and its HTTP status. */
export const ERROR_STATUS = {
  bad_request: 400,
  validation_failed: 400,
  malformed_json: 400,
  unauthorized: 401,
  invalid_credentials: 401,
  reauth_required: 401,
  csrf_failed: 403,
  forbidden: 403,
  not_found: 404,
  conflict: 409,
  token_replayed: 401,
  payload_too_large: 413,
  unsupported_media_type: 415,
  too_many_attempts: 429,
  headers_too_large: 431,
  unsupported_request_type: 422,
  action_not_implemented: 400,
  service_unavailable: 503,
  internal_error: 500,
} as const satisfies Record<string, ContentfulStatusCode>;

export type ErrorCode = keyof typeof ERROR_STATUS;

export interface ErrorDetail {
  path: string;
  message: string;
}

/** The one error type routes throw; `onError` turns it into `{ error: { code, message, requestId, details? } }`. */
export class ApiError extends HTTPException {
  readonly code: ErrorCode;
  readonly details?: ErrorDetail[];
  /** Extra response headers, e.g. Retry-After. */
  readonly headers?: Record<string, string>;

  constructor(code: ErrorCode, message: string, details?: ErrorDetail[], headers?: Record<string, string>) {
    super(ERROR_STATUS[code], { message });
    this.code = code;
    this.details = details;
    this.headers = headers;
  }
}

/** A failure of a domain verb that carries a stable, PII-free code (stored on failed requests and audit records). */
export class DomainError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/** Turns zod-style issues into `{ path, message }` without echoing the offending input. */
export function issuesToDetails(
  issues: ReadonlyArray<{ path: ReadonlyArray<PropertyKey>; message: string }>,
  prefix: PropertyKey[] = [],
): ErrorDetail[] {
  return issues.map((i) => ({ path: formatPath([...prefix, ...i.path]) || '(body)', message: i.message }));
}

function formatPath(path: PropertyKey[]): string {
  return path
    .map((p, idx) => (typeof p === 'number' ? `[${p}]` : `${idx === 0 ? '' : '.'}${String(p)}`))
    .join('');
}
