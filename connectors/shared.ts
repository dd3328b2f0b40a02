/** Helpers every adapter uses, so the three vendors verify, parse and classify responses the same way. */
import { createHash, timingSafeEqual } from 'node:crypto';
import { z } from 'zod';
import { issuesToDetails } from '../src/lib/errors.ts';
import { OutboundError, retryAfterMs, type OutboundResponse } from '../src/lib/outbound.ts';
import { WebhookPayloadError, type ReportResult, type TestCheck } from './types.ts';

/** Constant-time equality of two strings of any length (both are hashed first, so lengths leak nothing either). */
export function safeEqual(a: string, b: string): boolean {
  const ha = createHash('sha256').update(a, 'utf8').digest();
  const hb = createHash('sha256').update(b, 'utf8').digest();
  return timingSafeEqual(ha, hb);
}

/**
 * A check for a config map of request type names: two spellings of one type (same once normalised) mapped to
 * different actions would make the outcome depend on key order, so the later one is refused, naming it.
 */
export function distinctRequestTypes<A extends string>(normalise: (name: string) => string) {
  return (types: Record<string, A>, ctx: z.RefinementCtx): void => {
    const seen = new Map<string, A>();
    for (const [name, action] of Object.entries(types)) {
      const key = normalise(name);
      const earlier = seen.get(key);
      if (earlier && earlier !== action) {
        ctx.addIssue({ code: 'custom', path: [name], message: `maps a request type already mapped to ${earlier}` });
      }
      seen.set(key, action);
    }
  };
}

/** JSON.parse with a 400 that says so; the body itself never appears in the error. */
export function parseJson(rawBody: string): unknown {
  try {
    return JSON.parse(rawBody) as unknown;
  } catch {
    throw new WebhookPayloadError('malformed_json', 'the body is not valid JSON');
  }
}

/** Validates with zod; failures become a 400 naming the fields (never echoing their values). */
export function parseWith<T>(schema: z.ZodType<T>, value: unknown, what: string): T {
  const result = schema.safeParse(value);
  if (!result.success) {
    throw new WebhookPayloadError('validation_failed', `${what} failed validation`, issuesToDetails(result.error.issues));
  }
  return result.data;
}

/**
 * The usual meaning of a vendor's answer to a report: 2xx delivered; 408, 425, 429 and 5xx worth retrying (honouring
 * Retry-After); any other 4xx permanent. Adapters handle their vendor's exceptions (e.g. 409) before calling this.
 */
export function classifyResponse(res: OutboundResponse, what: string): ReportResult {
  if (res.status >= 200 && res.status < 300) return { kind: 'delivered' };
  const error = `${what}: HTTP ${res.status}`;
  if (res.status === 408 || res.status === 425 || res.status === 429 || res.status >= 500) {
    const wait = retryAfterMs(res.headers);
    return wait === null ? { kind: 'retry', error } : { kind: 'retry', error, retryAfterMs: wait };
  }
  return { kind: 'permanent', error };
}

/** A call that threw: network trouble and timeouts are retried, refused addresses and URLs are not. */
export function classifyOutboundError(err: unknown, what: string): ReportResult {
  if (err instanceof OutboundError) {
    const error = `${what}: ${err.message}`;
    return err.retryable ? { kind: 'retry', error } : { kind: 'permanent', error };
  }
  throw err;
}

/** Runs one check of a connector test, turning a thrown error into a failed check with a safe message. */
export async function check(name: string, fn: () => Promise<string>): Promise<TestCheck> {
  try {
    return { name, ok: true, detail: await fn() };
  } catch (err) {
    const detail = err instanceof OutboundError || err instanceof CheckFailed ? err.message : 'unexpected error';
    return { name, ok: false, detail };
  }
}

/**
 * A failed test check or vendor call with a message fit for the admin (no secrets, no personal data: never a vendor's
 * body) and a stable code (e.g. `upstream_http_error`); pull mode records both as a poll's last failure.
 */
export class CheckFailed extends Error {
  constructor(
    message: string,
    readonly code = 'upstream_error',
  ) {
    super(message);
  }
}

/** Host pattern match: `*.example.com` matches sub-domains (not the apex); anything else matches exactly. */
export function hostAllowed(host: string, patterns: readonly string[]): boolean {
  const h = host.toLowerCase().replace(/\.$/, '');
  return patterns.some((p) => {
    const pattern = p.toLowerCase();
    if (pattern.startsWith('*.')) return h.endsWith(pattern.slice(1)) && h.length > pattern.length - 1;
    return h === pattern;
  });
}

/**
 * How an error names a request type taken from a vendor body. Type names are tenant configuration, not personal
 * data, so they are named (the admin needs to know what to map); but a mis-rendered template can put an email or
 * free text in that field, and the name reaches the error body and the log, so anything that does not look like a
 * type name is withheld.
 */
export function nameOfType(value: string): string {
  const v = value.trim();
  if (v.includes('@')) return '(a value containing @)';
  return /^[\p{L}\p{N}][\p{L}\p{N} _.\-/&()']{0,63}$/u.test(v) ? JSON.stringify(v) : '(an unrecognised value)';
}

/**
 * A vendor API's base URL in connector config: http(s), and no query, fragment or credentials (API paths are
 * appended to it, and config is shown back to admins, unlike secrets; outbound calls refuse credentials in URLs).
 */
export function vendorBaseUrl(error: string) {
  return (
    z
      .url({ protocol: /^https?$/, error })
      // zod runs refinements even after .url() failed: only judge what parses.
      .refine((u) => {
        if (!URL.canParse(u)) return true;
        const url = new URL(u);
        return !url.search && !url.hash && !url.username && !url.password;
      }, 'must not contain a query, fragment or credentials')
  );
}
