import { createCipheriv, createDecipheriv, createHash, createHmac, randomBytes } from 'node:crypto';

/**
 * AES-256-GCM sealing of connector secrets and per-ticket capabilities (e.g. a Transcend nonce).
 *
 * Sealed form: `v1.<keyId>.<iv b64url>.<ciphertext+tag b64url>`. The key id names the master key that sealed the
 * value, so a later rotation can tell old ciphertexts from new and re-seal them. Every value is bound to where it
 * lives (additional authenticated data such as `connector:<id>:secrets`), so a ciphertext copied into another row
 * fails to open instead of lending that row its secret.
 */
export class Sealer {
  private readonly keys = new Map<string, Buffer>();
  readonly currentKeyId: string;

  /** `current` seals and opens; `previous` keys only open (during a rotation). */
  constructor(current: Buffer, previous: Buffer[] = []) {
    for (const k of [current, ...previous]) {
      if (k.length !== 32) throw new Error('encryption keys must be 32 bytes');
      this.keys.set(keyIdOf(k), k);
    }
    this.currentKeyId = keyIdOf(current);
  }

  seal(plaintext: string, context: string): string {
    const key = this.keys.get(this.currentKeyId)!;
    const iv = randomBytes(12);
    const cipher = createCipheriv('aes-256-gcm', key, iv);
    cipher.setAAD(Buffer.from(context, 'utf8'));
    const body = Buffer.concat([cipher.update(plaintext, 'utf8'), cipher.final(), cipher.getAuthTag()]);
    return `v1.${this.currentKeyId}.${iv.toString('base64url')}.${body.toString('base64url')}`;
  }

  open(sealed: string, context: string): string {
    const parts = sealed.split('.');
    if (parts.length !== 4 || parts[0] !== 'v1') throw new SealError('not a sealed value');
    const key = this.keys.get(parts[1]!);
    if (!key) throw new SealError(`sealed under unknown key id ${parts[1]}`);
    const iv = Buffer.from(parts[2]!, 'base64url');
    const body = Buffer.from(parts[3]!, 'base64url');
    if (iv.length !== 12 || body.length < 16) throw new SealError('sealed value is truncated');
    const decipher = createDecipheriv('aes-256-gcm', key, iv);
    decipher.setAAD(Buffer.from(context, 'utf8'));
    decipher.setAuthTag(body.subarray(body.length - 16));
    try {
      return Buffer.concat([decipher.update(body.subarray(0, body.length - 16)), decipher.final()]).toString('utf8');
    } catch {
      throw new SealError('sealed value failed authentication (wrong key or context)');
    }
  }

  keyIdOfSealed(sealed: string): string | null {
    const parts = sealed.split('.');
    return parts.length === 4 ? parts[1]! : null;
  }
}

/** The sealer for a master key (base64-decoded) and the earlier keys still being rotated away from (base64). */
export function sealerFor(current: Buffer, previousBase64: string[]): Sealer {
  return new Sealer(
    current,
    previousBase64.map((k) => Buffer.from(k, 'base64')),
  );
}

export class SealError extends Error {
  override name = 'SealError';
}

/** Public id of a master key: the first 8 hex digits of its SHA-256 (reveals nothing usable about the key). */
export function keyIdOf(key: Buffer): string {
  return `k${createHash('sha256').update(key).digest('hex').slice(0, 8)}`;
}

/**
 * Short, keyed fingerprint of a secret so an admin can tell which value is set without seeing it. Keyed (not a plain
 * hash) so a fingerprint of a low-entropy secret such as a password cannot be brute-forced offline.
 */
export function secretFingerprint(fingerprintKey: Buffer, value: string): string {
  return createHmac('sha256', fingerprintKey).update(`secret-fingerprint\u0000${value}`).digest('hex').slice(0, 8);
}
