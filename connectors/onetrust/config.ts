/** OneTrust settings: where the tenant lives, how its workflow authenticates to us, what its request types mean. */
import { z } from 'zod';
import { distinctRequestTypes, vendorBaseUrl } from '../shared.ts';

export type RequestTypeAction = 'erase' | 'suppress' | 'unsuppress' | 'access';

/**
 * Request types are tenant-configured strings, so these only cover the usual names; `config.requestTypes` is merged
 * over them (matching is case-insensitive and ignores surrounding whitespace).
 */
export const DEFAULT_REQUEST_TYPES: Readonly<Record<string, RequestTypeAction>> = {
  'Delete Data': 'erase',
  'Delete My Data': 'erase',
  Deletion: 'erase',
  Erasure: 'erase',
  'Right to Erasure': 'erase',
  'Right to be Forgotten': 'erase',
  'Do Not Sell': 'suppress',
  'Do Not Sell or Share': 'suppress',
  'Do Not Sell My Personal Information': 'suppress',
  'Opt Out': 'suppress',
  'Opt-Out': 'suppress',
  'Restrict Processing': 'suppress',
  'Restriction of Processing': 'suppress',
  'Object to Processing': 'suppress',
  'Opt In': 'unsuppress',
  'Opt-In': 'unsuppress',
  'Data Portability': 'access',
  Access: 'access',
  'Access My Data': 'access',
  'Right to Access': 'access',
};

export function normaliseRequestType(name: string): string {
  return name.trim().toLowerCase();
}

/** RFC 9110 token: what a header name may be made of. */
const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

const inboundAuthSchema = z.discriminatedUnion('type', [
  z.strictObject({ type: z.literal('bearer') }),
  z.strictObject({
    type: z.literal('api_key'),
    header: z.string().regex(HEADER_NAME, 'must be a valid HTTP header name').default('x-api-key'),
  }),
  z.strictObject({
    type: z.literal('basic'),
    // RFC 7617: the first colon separates user from password, so a username containing one could never match.
    username: z.string().min(1).regex(/^[^:]*$/, 'must not contain a colon'),
  }),
]);

export const configSchema = z.strictObject({
  baseUrl: vendorBaseUrl('must be the http(s) URL of the OneTrust tenant, e.g. https://app.onetrust.com'),
  inboundAuth: inboundAuthSchema.default({ type: 'bearer' }),
  requestTypes: z
    .record(z.string().trim().min(1), z.enum(['erase', 'suppress', 'unsuppress', 'access']))
    .default({})
    .superRefine(distinctRequestTypes(normaliseRequestType)),
  internalComment: z.boolean().default(true),
});

export const secretsSchema = z.strictObject({
  clientId: z.string().min(1),
  clientSecret: z.string().min(1),
  inboundSecret: z.string().min(1),
});

export type OneTrustConfig = z.output<typeof configSchema>;
export type OneTrustSecrets = z.output<typeof secretsSchema>;
export type InboundAuth = OneTrustConfig['inboundAuth'];

/** The action table in force: built-in defaults, then the connector's own entries, keyed by normalised name. */
export function requestTypeTable(config: OneTrustConfig): Map<string, RequestTypeAction> {
  const table = new Map<string, RequestTypeAction>();
  for (const types of [DEFAULT_REQUEST_TYPES, config.requestTypes]) {
    for (const [name, action] of Object.entries(types)) table.set(normaliseRequestType(name), action);
  }
  return table;
}
