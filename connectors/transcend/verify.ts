/** Verification of Transcend's `x-sombra-token`: an ES384 JWT signed by Sombra's general signing key. */
import { createHash } from 'node:crypto';
import { decodeProtectedHeader, errors, importSPKI, jwtVerify, type JWTPayload } from 'jose';
import {
  WebhookAuthError,
  WebhookUnavailableError,
  type AdapterContext,
  type RawWebhook,
  type Verified,
} from '../types.ts';
import type { TranscendConnector } from './config.ts';
import { SombraError, sombraGet } from './sombra.ts';

const ALG = 'ES384';
const KEY_PATH = '/public-keys/sombra-general-signing-key';
const KEY_TTL_MS = 60 * 60 * 1000;
/**
 * A bad signature refetches the key in case Sombra rotated it, but not if the key in hand is this fresh: otherwise
 * every forged token would cost an authenticated call to Sombra.
 */
const REFETCH_MIN_AGE_MS = 60 * 1000;

/** Leeway for the clocks of Sombra and this server disagreeing on `exp`/`nbf`. */
const CLOCK_TOLERANCE_S = 30;

type PublicKey = Awaited<ReturnType<typeof importSPKI>>;

/** PEM text rather than the imported key, so the cache may hold it however it likes (a copy, serialised). */
interface CachedKey {
  pem: string;
  fetchedAt: number;
}

/** Fetches Sombra's signing key (PEM text). Throws SombraError with an admin-safe message. */
export async function fetchSigningKey(conn: TranscendConnector, ctx: AdapterContext): Promise<string> {
  return (await sombraGet(conn, ctx, KEY_PATH, 'signing key', 'text/plain, */*')).text.trim();
}

/** Imports the PEM as an ES384 public key; anything else is Sombra's fault, not the sender's. */
export async function importSigningKey(pem: string): Promise<PublicKey> {
  try {
    return await importSPKI(pem, ALG);
  } catch {
    throw new SombraError('signing key: the response is not an ES384 public key in PEM form', 'upstream_bad_response');
  }
}

/**
 * Imported keys by PEM text: importing costs about as much as verifying, and every webhook of a connector carries a
 * token signed by the same key. Bounded; a rotated key simply adds an entry and the oldest goes.
 */
const imported = new Map<string, Promise<PublicKey>>();
const IMPORTED_MAX = 64;

function importedKey(pem: string): Promise<PublicKey> {
  let key = imported.get(pem);
  if (!key) {
    key = importSPKI(pem, ALG);
    key.catch(() => imported.delete(pem));
    if (imported.size >= IMPORTED_MAX) imported.delete(imported.keys().next().value!);
    imported.set(pem, key);
  }
  return key;
}

function cacheKey(conn: TranscendConnector): string {
  const fingerprint = createHash('sha256').update(`${conn.config.sombraUrl}\n${conn.secrets.apiKey}`).digest('hex');
  return `transcend:${conn.id}:signing-key:${fingerprint.slice(0, 32)}`;
}

async function loadKey(conn: TranscendConnector, ctx: AdapterContext): Promise<CachedKey> {
  try {
    const pem = await fetchSigningKey(conn, ctx);
    await importSigningKey(pem);
    const entry = { pem, fetchedAt: ctx.now().getTime() };
    ctx.cache.set(cacheKey(conn), entry, KEY_TTL_MS);
    return entry;
  } catch (err) {
    if (err instanceof SombraError) {
      ctx.logger.warn({ connectorId: conn.id, reason: err.message }, 'transcend: signing key unavailable');
      throw new WebhookUnavailableError(`Transcend ${err.message}`);
    }
    throw err;
  }
}

/** The failed check, named; never the token or its claims. */
function authFailure(err: unknown): WebhookAuthError {
  const check =
    err instanceof errors.JOSEAlgNotAllowed
      ? 'algorithm not allowed'
      : err instanceof errors.JWSSignatureVerificationFailed
        ? 'bad signature'
        : err instanceof errors.JWTExpired
          ? 'token expired'
          : err instanceof errors.JWTClaimValidationFailed
            ? err.claim === 'aud'
              ? 'audience mismatch'
              : `claim ${err.claim} check failed`
            : 'malformed token';
  return new WebhookAuthError(`x-sombra-token: ${check}`);
}

async function checkToken(
  token: string,
  pem: string,
  conn: TranscendConnector,
  ctx: AdapterContext,
): Promise<JWTPayload> {
  // The PEM was imported once when fetched, so this cannot fail on the key itself.
  const { payload } = await jwtVerify(token, await importedKey(pem), {
    algorithms: [ALG],
    audience: conn.config.audience,
    currentDate: ctx.now(),
    clockTolerance: CLOCK_TOLERANCE_S,
  });
  return payload;
}

export async function verifyToken(req: RawWebhook, conn: TranscendConnector, ctx: AdapterContext): Promise<Verified> {
  const token = req.header('x-sombra-token');
  if (!token) throw new WebhookAuthError('x-sombra-token: header missing');
  // Refuse other algorithms before anything else, so such a token never costs a key fetch.
  let alg: unknown;
  try {
    alg = decodeProtectedHeader(token).alg;
  } catch {
    throw new WebhookAuthError('x-sombra-token: malformed token');
  }
  if (alg !== ALG) throw new WebhookAuthError('x-sombra-token: algorithm not allowed');

  const cached = ctx.cache.get<CachedKey>(cacheKey(conn));
  let entry = cached ?? (await loadKey(conn, ctx));
  let payload: JWTPayload;
  try {
    payload = await checkToken(token, entry.pem, conn, ctx);
  } catch (err) {
    const mayHaveRotated =
      cached !== undefined &&
      err instanceof errors.JWSSignatureVerificationFailed &&
      ctx.now().getTime() - entry.fetchedAt >= REFETCH_MIN_AGE_MS;
    if (!mayHaveRotated) throw authFailure(err);
    entry = await loadKey(conn, ctx);
    try {
      payload = await checkToken(token, entry.pem, conn, ctx);
    } catch (retryErr) {
      throw authFailure(retryErr);
    }
  }

  if (payload.scope !== 'coreIdentifier') throw new WebhookAuthError('x-sombra-token: scope mismatch');
  if (typeof payload.value !== 'string' || !payload.value) {
    throw new WebhookAuthError('x-sombra-token: value claim missing');
  }
  return {
    ...(typeof payload.jti === 'string' && payload.jti ? { tokenId: payload.jti } : {}),
    // Accepted until exp plus the leeway, so the replay record must outlive exp by as much.
    ...(payload.exp !== undefined ? { tokenExpiresAt: new Date((payload.exp + CLOCK_TOLERANCE_S) * 1000) } : {}),
    claims: { value: payload.value },
  };
}
