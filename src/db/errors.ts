import { DomainError } from '../lib/errors.ts';

/** The error and its causes (drizzle wraps driver errors in its own). */
function* causes(err: unknown): Generator<{ code?: unknown; severity?: unknown }> {
  for (let e: unknown = err, depth = 0; e && typeof e === 'object' && depth < 5; e = (e as { cause?: unknown }).cause, depth++) {
    yield e as { code?: unknown; severity?: unknown };
  }
}

/** Errors worth another attempt: serialisation/deadlock, connection loss, resource exhaustion, shutdown. */
export function isTransient(err: unknown): boolean {
  const code = pgCode(err);
  if (code) return /^(40|08|53|57P0|55P03)/.test(code);
  for (const e of causes(err)) {
    if (typeof e.code === 'string' && /^(ECONNRESET|ECONNREFUSED|EPIPE|ETIMEDOUT|CONNECT_TIMEOUT|CONNECTION_)/.test(e.code)) {
      return true;
    }
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

/** The column a constraint error names (NOT NULL, check), if the driver passed it on. */
export function columnOf(err: unknown): string | undefined {
  for (const e of causes(err)) {
    const column = (e as { column_name?: unknown }).column_name;
    if (typeof column === 'string') return column;
  }
  return undefined;
}

export const isUniqueViolation = (err: unknown): boolean => pgCode(err) === '23505';
