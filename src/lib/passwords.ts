import { randomBytes, scrypt, timingSafeEqual, type ScryptOptions } from 'node:crypto';

/**
 * Password hashing with scrypt from node:crypto. The stored form records its parameters —
 * `scrypt$n=32768,r=8,p=1$<salt b64url>$<hash b64url>` — so the cost can be raised later while old hashes still
 * verify (and are re-hashed at the next successful login).
 */
export interface ScryptParams {
  n: number;
  r: number;
  p: number;
}

/** N=2^15, r=8, p=1: 32 MiB and tens of milliseconds per hash on a current core. */
export const DEFAULT_SCRYPT: ScryptParams = { n: 32768, r: 8, p: 1 };
const KEY_LENGTH = 32;
const SALT_LENGTH = 16;
/** scrypt needs 128·N·r bytes: refuse stored parameters above 256 MiB (eight times today's). */
const MAX_SCRYPT_MEMORY = 256 * 1024 * 1024;

export const PASSWORD_MIN_LENGTH = 12;
export const PASSWORD_MAX_LENGTH = 1024;

function derive(password: string, salt: Buffer, params: ScryptParams): Promise<Buffer> {
  const opts: ScryptOptions = { N: params.n, r: params.r, p: params.p, maxmem: 256 * params.n * params.r + 1024 * 1024 };
  return new Promise((resolve, reject) => {
    scrypt(password.normalize('NFKC'), salt, KEY_LENGTH, opts, (err, key) => (err ? reject(err) : resolve(key)));
  });
}

export async function hashPassword(password: string, params: ScryptParams = DEFAULT_SCRYPT): Promise<string> {
  const salt = randomBytes(SALT_LENGTH);
  const key = await derive(password, salt, params);
  return `scrypt$n=${params.n},r=${params.r},p=${params.p}$${salt.toString('base64url')}$${key.toString('base64url')}`;
}

interface Parsed {
  params: ScryptParams;
  salt: Buffer;
  key: Buffer;
}

const STORED = /^scrypt\$n=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9_-]+)\$([A-Za-z0-9_-]+)$/;

function parse(stored: string): Parsed | null {
  const m = STORED.exec(stored);
  if (!m) return null;
  const params = { n: Number(m[1]), r: Number(m[2]), p: Number(m[3]) };
  // Refuse parameters nobody wrote on purpose (and that could exhaust memory).
  if (
    params.n < 1024 ||
    (params.n & (params.n - 1)) !== 0 ||
    params.r < 1 ||
    params.p < 1 ||
    params.p > 16 ||
    128 * params.n * params.r > MAX_SCRYPT_MEMORY
  ) {
    return null;
  }
  return { params, salt: Buffer.from(m[4]!, 'base64url'), key: Buffer.from(m[5]!, 'base64url') };
}

// Verified against when the account does not exist, so an unknown email costs the same as a wrong password.
// Made on first use: Workers forbid random values at module scope.
let dummy: Parsed | undefined;
const DUMMY = () => (dummy ??= { params: DEFAULT_SCRYPT, salt: randomBytes(SALT_LENGTH), key: randomBytes(KEY_LENGTH) });

/**
 * Checks a password against a stored hash, or against a dummy of the same cost when `stored` is null (unknown
 * account): both paths do one full scrypt and one constant-time comparison.
 */
export async function verifyPassword(password: string, stored: string | null): Promise<boolean> {
  const real = stored ? parse(stored) : null;
  const parsed = real ?? DUMMY();
  const key = await derive(password, parsed.salt, parsed.params);
  const equal = key.length === parsed.key.length && timingSafeEqual(key, parsed.key);
  return equal && real !== null;
}

/** True when the hash was made with other parameters than today's: re-hash it after a successful login. */
export function needsRehash(stored: string, params: ScryptParams = DEFAULT_SCRYPT): boolean {
  const parsed = parse(stored);
  return !parsed || parsed.params.n !== params.n || parsed.params.r !== params.r || parsed.params.p !== params.p;
}

/** A random password for admins created without one (shown once). */
export function generatePassword(): string {
  return randomBytes(18).toString('base64url');
}
