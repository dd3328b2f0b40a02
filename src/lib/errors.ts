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
  method_not_allowed: 405,
  conflict: 409,
  token_replayed: 401,
  payload_too_large: 413,
  unsupported_media_type: 415,
  too_many_attempts: 429,
  headers_too_large: 431,
  unsupported_request_type: 422,
  action_not_implemented: 400,
  service_unavailable: 503,
  intake_contention: 503,
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

/**
 * Turns zod-style issues into `{ path, message }` without echoing the offending input. Object keys are input too
 * (a client may key a map by email address): only keys shaped like field names are repeated.
 */
export function issuesToDetails(
  issues: ReadonlyArray<{ path: ReadonlyArray<PropertyKey>; message: string; code?: string; keys?: ReadonlyArray<string> }>,
  prefix: PropertyKey[] = [],
): ErrorDetail[] {
  return issues.map((i) => ({
    path: formatPath([...prefix, ...i.path]) || '(body)',
    message: i.code === 'unrecognized_keys' && i.keys ? unrecognized(i.keys) : i.message,
  }));
}

/** A field name: what a client's typo looks like, as opposed to a value used as a key. */
const FIELD_NAME = /^[A-Za-z_$][\w$-]{0,63}$/;

function unrecognized(keys: ReadonlyArray<string>): string {
  const shown = keys.filter((k) => FIELD_NAME.test(k)).map((k) => `"${k}"`);
  const hidden = keys.length - shown.length;
  const parts = [...shown, ...(hidden > 0 ? [`${hidden} key${hidden === 1 ? '' : 's'} not shown`] : [])];
  return `Unrecognized key${keys.length === 1 ? '' : 's'}: ${parts.join(', ')}`;
}

function formatPath(path: PropertyKey[]): string {
  return path
    .map((p, idx) => {
      if (typeof p === 'number') return `[${p}]`;
      const name = FIELD_NAME.test(String(p)) ? String(p) : '[key]';
      return `${idx === 0 || name === '[key]' ? '' : '.'}${name}`;
    })
    .join('');
}
