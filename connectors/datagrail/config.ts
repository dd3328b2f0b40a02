import net from 'node:net';
import { z } from 'zod';
import { distinctRequestTypes, hostAllowed } from '../shared.ts';

export const REQUEST_KINDS = ['erase', 'suppress', 'unsuppress', 'access', 'health_check'] as const;
export type RequestKind = (typeof REQUEST_KINDS)[number];

/** Request type names are compared trimmed and lower-cased, in config keys and in webhook bodies alike. */
export function normaliseRequestType(name: string): string {
  return name.trim().toLowerCase();
}

// DataGrail's per-kind names are unconfirmed: these cover the spellings seen in its docs; tenants add their own.
const DEFAULT_REQUEST_TYPES: Record<string, RequestKind> = {
  deletion: 'erase',
  delete: 'erase',
  opt_out: 'suppress',
  'opt-out': 'suppress',
  optout: 'suppress',
  opt_in: 'unsuppress',
  'opt-in': 'unsuppress',
  access: 'access',
  health_check: 'health_check',
  'health-check': 'health_check',
  'health check': 'health_check',
  healthcheck: 'health_check',
};

const LABEL = '[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?';
const HOSTNAME = new RegExp(`^(?=.{1,253}$)${LABEL}(?:\\.${LABEL})*$`);

/**
 * `*.domain.tld` or a plain hostname / IP address, in the form `URL.hostname` produces (lower case; IPv6 without
 * brackets, compressed) so that matching is a plain comparison. Null when the pattern is not one of those.
 */
function canonicalHostPattern(raw: string): string | null {
  const pattern = raw.trim().toLowerCase();
  if (pattern.startsWith('*.')) {
    const domain = pattern.slice(2);
    // A bare `*.tld` would allow every site under a public suffix.
    return HOSTNAME.test(domain) && domain.includes('.') ? pattern : null;
  }
  if (net.isIPv6(pattern)) {
    // node:net also takes a zone id (`fe80::1%eth0`), which no URL can carry: such a host could never match.
    const url = `http://[${pattern}]/`;
    return URL.canParse(url) ? new URL(url).hostname.slice(1, -1) : null;
  }
  return HOSTNAME.test(pattern) ? pattern : null;
}

export const callbackHostsSchema = z
  .array(
    z.string().transform((raw, ctx) => {
      const pattern = canonicalHostPattern(raw);
      if (pattern === null) {
        ctx.addIssue({
          code: 'custom',
          message: 'must be "*.domain.tld" or a plain hostname or IP address (no scheme, port or path)',
        });
        return z.NEVER;
      }
      return pattern;
    }),
  )
  .min(1, 'at least one callback host is required');

export const configSchema = z.strictObject({
  identifiers: z
    .array(z.strictObject({ name: z.string().trim().min(1), kind: z.enum(['email', 'user_id']) }))
    .min(1)
    .default([
      { name: 'user_id', kind: 'user_id' },
      { name: 'email', kind: 'email' },
    ]),
  requestTypes: z
    .record(z.string().trim().min(1), z.enum(REQUEST_KINDS))
    .default({})
    .superRefine(distinctRequestTypes(normaliseRequestType))
    .transform((custom) => {
      const merged: Record<string, RequestKind> = { ...DEFAULT_REQUEST_TYPES };
      for (const [name, kind] of Object.entries(custom)) merged[normaliseRequestType(name)] = kind;
      return merged;
    }),
  callbackHosts: callbackHostsSchema.default(['*.datagrail.io']),
  timestampToleranceSeconds: z.number().int().min(1).max(3600).default(300),
});

export type Config = z.output<typeof configSchema>;

export const secretsSchema = z.strictObject({
  webhookSecret: z.string().min(1),
  apiKey: z.string().min(1),
});

export type Secrets = z.output<typeof secretsSchema>;

/**
 * The callback URL, or what is wrong with it (naming the field, never echoing the URL). Plain http is accepted here
 * because the outbound client refuses it anyway unless the server allows private networks (tests, development).
 */
export function checkCallbackUrl(raw: string, patterns: readonly string[]): { url: URL } | { problem: string } {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    return { problem: 'callback_url is not a valid URL' };
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') return { problem: 'callback_url is not an http(s) URL' };
  if (url.username || url.password) return { problem: 'callback_url must not contain credentials' };
  if (!hostAllowed(url.hostname.replace(/^\[(.*)\]$/, '$1'), patterns)) {
    return { problem: "callback_url host is not in the connector's allowed callback hosts" };
  }
  return { url };
}
