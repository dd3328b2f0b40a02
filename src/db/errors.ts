import { DomainError } from '../lib/errors.ts';

/** The error and its causes (drizzle wraps driver errors in its own). */
function* causes(err: unknown): Generator<{ code?: unknown; severity?: unknown }> {
  for (let e: unknown = err, depth = 0; e && typeof e === 'object' && depth < 5; e = (e as { cause?: unknown }).cause, depth++) {
    yield e as { code?: unknown; severity?: unknown };
  }
}

/**
 * On Workers the driver's socket is workerd's (cloudflare:sockets), whose errors carry no code: a refused connection
 * and a dropped one are told apart only by these messages.
 */
const WORKERD_SOCKET_ERRORS = new Set(['proxy request failed, cannot connect to the specified address', 'Network connection lost.']);

/** Errors worth another attempt: serialisation/deadlock, connection loss, resource exhaustion, shutdown. */
export function isTransient(err: unknown): boolean {
  const code = pgCode(err);
  if (code) return /^(40|08|53|57P0|55P03)/.test(code);
  for (const e of causes(err)) {
    if (typeof e.code === 'string' && /^(ECONNRESET|ECONNREFUSED|EPIPE|ETIMEDOUT|CONNECT_TIMEOUT|CONNECTION_)/.test(e.code)) {
      return true;
    }
    if (e instanceof Error && e.code === undefined && WORKERD_SOCKET_ERRORS.has(e.message)) return true;
  }
  return false;
}

export function pgCode(err: unknown): string | undefined {
  for (const e of causes(err)) {
    if (typeof e.code === 'string' && /^[0-9A-Z]{5}$/.test(e.code) && e.severity) return e.code;
  }
  return undefined;
}

/** A stable code with no personal data in it: database messages can quote row values, so only SQLSTATEs survive. */
export function errorCodeOf(err: unknown): string {
  if (err instanceof DomainError) return err.code;
  const code = pgCode(err);
  return code ? `db_${code}` : 'internal_error';
}

/**
 * Class 22 (data exception): a value PostgreSQL cannot store, e.g. a NUL character. The value came from the caller,
 * so it is their mistake, answered as validation_failed with this message (the database's own quotes the value).
 */
export const isUnstorableValue = (err: unknown): boolean => pgCode(err)?.startsWith('22') ?? false;
export const UNSTORABLE_VALUE_MESSAGE = 'cannot be stored (for example a NUL character or an out-of-range number)';

/**
 * A code safe to show an operator for any error: errorCodeOf's, else a Node or driver code such as ECONNREFUSED or
 * CONNECTION_CLOSED. Never a message: a failed query's message carries its SQL and parameters.
 */
export function safeErrorCode(err: unknown): string {
  const code = errorCodeOf(err);
  if (code !== 'internal_error') return code;
  for (const e of causes(err)) {
    if (typeof e.code === 'string' && /^[A-Z][A-Z0-9_]{1,63}$/.test(e.code)) return e.code;
  }
  return code;
}

/** The column a constraint error names (NOT NULL, check), if the driver passed it on. */
export function columnOf(err: unknown): string | undefined {
  for (const e of causes(err)) {
    const column = (e as { column_name?: unknown }).column_name;
    if (typeof column === 'string') return column;
  }
  return undefined;
}

export const isUniqueViolation = (err: unknown): boolean => pgCode(err) === '23505';
