/** Transcend settings, and the mappings from Transcend's vocabulary to ours (each decided in exactly one place). */
import { z } from 'zod';
import { vendorBaseUrl } from '../shared.ts';
import { WebhookPayloadError, type ConnectorInstance, type SubjectRef, type TicketAction } from '../types.ts';

/** The Transcend action types this connector carries out, and what each becomes here. */
export const ACTIONS = {
  ERASURE: 'erase',
  ACCOUNT_DELETION: 'erase',
  SALE_OPT_OUT: 'suppress',
  TRACKING_OPT_OUT: 'suppress',
  CONTACT_OPT_OUT: 'suppress',
  AUTOMATED_DECISION_MAKING_OPT_OUT: 'suppress',
  USE_OF_SENSITIVE_INFORMATION_OPT_OUT: 'suppress',
  CUSTOM_OPT_OUT: 'suppress',
  RESTRICTION: 'suppress',
  SALE_OPT_IN: 'unsuppress',
  TRACKING_OPT_IN: 'unsuppress',
  CONTACT_OPT_IN: 'unsuppress',
  AUTOMATED_DECISION_MAKING_OPT_IN: 'unsuppress',
  USE_OF_SENSITIVE_INFORMATION_OPT_IN: 'unsuppress',
  CUSTOM_OPT_IN: 'unsuppress',
  PLACE_ON_LEGAL_HOLD: 'hold',
  REMOVE_FROM_LEGAL_HOLD: 'release_hold',
} as const satisfies Record<string, TicketAction>;

export type TranscendAction = keyof typeof ACTIONS;

const ACTION_NAMES = Object.keys(ACTIONS) as [TranscendAction, ...TranscendAction[]];
const ACCESS_ACTIONS = new Set(['ACCESS', 'BUSINESS_PURPOSE']);

/**
 * Throws 400 action_not_implemented for any type we do not carry out. The type is named only when it has the shape
 * of a RequestAction name, so a verified sender still cannot make us echo arbitrary text.
 */
export function actionFor(type: string): TicketAction {
  if (Object.hasOwn(ACTIONS, type)) return ACTIONS[type as TranscendAction];
  const shown = /^[A-Z][A-Z0-9_]{0,63}$/.test(type) ? type : '(unrecognised type)';
  const why = ACCESS_ACTIONS.has(type) ? ': access requests are not implemented yet' : '';
  throw new WebhookPayloadError('action_not_implemented', `Transcend action ${shown} is not implemented${why}`);
}

const pullSchema = z
  .strictObject({
    enabled: z.boolean().default(false),
    dataSiloId: z.string().min(1).optional(),
    actions: z.array(z.enum(ACTION_NAMES)).min(1).default(['ERASURE']),
    intervalMinutes: z.number().int().min(1).max(1440).default(5),
  })
  .superRefine((pull, ctx) => {
    if (pull.enabled && !pull.dataSiloId) {
      const message = 'dataSiloId is required when pull.enabled is true';
      ctx.addIssue({ code: 'custom', path: ['dataSiloId'], message });
    }
  });

export const configSchema = z.strictObject({
  /** Multi-tenant EU/US Sombra or the customer's own ingress; a trailing slash is tolerated. */
  sombraUrl: vendorBaseUrl('must be the http(s) URL of Sombra, e.g. https://multi-tenant.sombra.transcend.io'),
  /** The Sombra audience configured on the integration: the `aud` every webhook token must carry. */
  audience: z.string().min(1),
  selfHostedSombra: z.boolean().default(false),
  /**
   * Transcend identifier name (`extras.profile.type`) → our subject kind; names not listed are user ids, except
   * Transcend's own `email`, which stays an email unless listed.
   */
  identifierTypes: z.record(z.string().min(1), z.enum(['email', 'user_id'])).default({ email: 'email' }),
  pull: pullSchema.default({ enabled: false, actions: ['ERASURE'], intervalMinutes: 5 }),
});

export const secretsSchema = z.strictObject({
  /** Transcend API key with access to this integration's data silo. */
  apiKey: z.string().min(1),
  /** Only for a self-hosted Sombra (`selfHostedSombra: true`), where it is then required. */
  sombraApiKey: z.string().min(1).optional(),
});

export type Config = z.output<typeof configSchema>;
export type Secrets = z.output<typeof secretsSchema>;

/** A self-hosted Sombra wants its own API key on every call: without it nothing could be verified or reported. */
export function settingsProblems(config: Config, secrets: Secrets): { path: string; message: string }[] {
  return config.selfHostedSombra && !secrets.sombraApiKey
    ? [{ path: 'secrets.sombraApiKey', message: 'required when config.selfHostedSombra is true' }]
    : [];
}
export type TranscendConnector = ConnectorInstance<Config, Secrets>;

/**
 * Who a ticket is about, for webhooks and pull mode alike: the profile's identifier, typed through
 * `identifierTypes`; without a profile, the core identifier as a user id. A map listing only custom names must not
 * turn email addresses into user ids: nobody would be found, and the job would be reported as "no data found".
 */
export function subjectFor(
  config: Config,
  profile: { identifier: string; type: string } | undefined,
  coreIdentifier: string,
): SubjectRef {
  if (!profile) return { kind: 'user_id', value: coreIdentifier };
  const kind = Object.hasOwn(config.identifierTypes, profile.type)
    ? config.identifierTypes[profile.type]!
    : profile.type === 'email'
      ? 'email'
      : 'user_id';
  return { kind, value: profile.identifier };
}
