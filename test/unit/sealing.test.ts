import { createHash, randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { keyIdOf, SealError, Sealer, secretFingerprint } from '../../src/lib/sealing.ts';

const CTX = 'connector:con_test:secrets';
const SEALED = /^v1\.(k[0-9a-f]{8})\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)$/;

/** Flips one bit of a base64url segment's decoded bytes and re-encodes it. */
function flipBit(segment: string, byte = 0): string {
  const buf = Buffer.from(segment, 'base64url');
  buf[byte] = buf[byte]! ^ 0x01;
  return buf.toString('base64url');
}

describe('Sealer', () => {
  it('round trips, including empty and non-ASCII plaintext', () => {
    const sealer = new Sealer(randomBytes(32));
    for (const plain of ['{"apiKey":"s3cret"}', '', 'ünïcödé 🔑 \u0000 end']) {
      expect(sealer.open(sealer.seal(plain, CTX), CTX)).toBe(plain);
    }
  });

  it('seals as v1.<kid>.<iv>.<ciphertext+tag>, with a 12-byte IV, the current key id and no plaintext', () => {
    const key = randomBytes(32);
    const sealer = new Sealer(key);
    const plain = 'my-very-secret-api-key';
    const sealed = sealer.seal(plain, CTX);
    const m = SEALED.exec(sealed);
    expect(m, sealed).not.toBeNull();
    expect(m![1]).toBe(keyIdOf(key));
    expect(m![1]).toBe(sealer.currentKeyId);
    expect(sealer.keyIdOfSealed(sealed)).toBe(keyIdOf(key));
    expect(Buffer.from(m![2]!, 'base64url')).toHaveLength(12);
    // AES-GCM: ciphertext is as long as the plaintext, plus the 16-byte tag.
    expect(Buffer.from(m![3]!, 'base64url')).toHaveLength(Buffer.byteLength(plain) + 16);
    expect(sealed).not.toContain(plain);
    expect(Buffer.from(m![3]!, 'base64url').toString('utf8')).not.toContain(plain);
  });

  it('uses a fresh IV each time: the same plaintext seals differently and both open', () => {
    const sealer = new Sealer(randomBytes(32));
    const seals = Array.from({ length: 20 }, () => sealer.seal('same', CTX));
    expect(new Set(seals).size).toBe(seals.length);
    expect(new Set(seals.map((s) => s.split('.')[2])).size).toBe(seals.length);
    for (const s of seals) expect(sealer.open(s, CTX)).toBe('same');
  });

  it('refuses to open under another context (AAD): a value copied to another row does not open', () => {
    const sealer = new Sealer(randomBytes(32));
    const sealed = sealer.seal('secret', 'connector:con_a:secrets');
    expect(() => sealer.open(sealed, 'connector:con_b:secrets')).toThrow(SealError);
    expect(() => sealer.open(sealed, '')).toThrow(SealError);
    expect(sealer.open(sealed, 'connector:con_a:secrets')).toBe('secret');
  });

  it('refuses tampered ciphertext, tag, IV and truncated or malformed values', () => {
    const sealer = new Sealer(randomBytes(32));
    const sealed = sealer.seal('secret value', CTX);
    const [v, kid, iv, body] = sealed.split('.') as [string, string, string, string];
    const bodyLen = Buffer.from(body, 'base64url').length;
    const variants = [
      [v, kid, iv, flipBit(body, 0)], // ciphertext
      [v, kid, iv, flipBit(body, bodyLen - 1)], // tag
      [v, kid, flipBit(iv, 0), body], // iv
      [v, kid, iv, Buffer.from(body, 'base64url').subarray(0, 15).toString('base64url')], // shorter than a tag
      [v, kid, Buffer.alloc(8).toString('base64url'), body], // iv of the wrong size
      ['v2', kid, iv, body],
      [v, kid, iv],
      [v, kid, iv, body, 'extra'],
    ];
    for (const parts of variants) {
      expect(() => sealer.open(parts.join('.'), CTX), parts.join('.')).toThrow(SealError);
    }
    expect(() => sealer.open('not sealed at all', CTX)).toThrow(SealError);
    expect(() => sealer.open('', CTX)).toThrow(SealError);
  });

  it('opens values sealed under a previous key after rotation, while new seals use the new key id', () => {
    const oldKey = randomBytes(32);
    const newKey = randomBytes(32);
    const before = new Sealer(oldKey);
    const oldSealed = before.seal('legacy secret', CTX);

    const rotated = new Sealer(newKey, [oldKey]);
    expect(rotated.currentKeyId).toBe(keyIdOf(newKey));
    expect(rotated.open(oldSealed, CTX)).toBe('legacy secret');
    expect(rotated.keyIdOfSealed(oldSealed)).toBe(keyIdOf(oldKey));

    const fresh = rotated.seal('new secret', CTX);
    expect(rotated.keyIdOfSealed(fresh)).toBe(keyIdOf(newKey));
    expect(rotated.open(fresh, CTX)).toBe('new secret');
    // The old-key-only sealer cannot open what the new key sealed.
    expect(() => before.open(fresh, CTX)).toThrow(SealError);
  });

  it('refuses a value sealed under a key id it does not know, naming only the key id', () => {
    const a = new Sealer(randomBytes(32));
    const b = new Sealer(randomBytes(32));
    const sealed = a.seal('secret', CTX);
    expect(() => b.open(sealed, CTX)).toThrow(SealError);
    expect(() => b.open(sealed, CTX)).toThrow(a.currentKeyId);
    // A forged key id naming b's key with a's ciphertext fails authentication, not decryption into garbage.
    const forged = sealed.replace(a.currentKeyId, b.currentKeyId);
    expect(() => b.open(forged, CTX)).toThrow(SealError);
  });

  it('rejects keys that are not 32 bytes', () => {
    expect(() => new Sealer(randomBytes(16))).toThrow();
    expect(() => new Sealer(randomBytes(32), [randomBytes(31)])).toThrow();
  });
});

describe('keyIdOf', () => {
  it('is stable for a key, differs between keys, and reveals nothing of the key', () => {
    const key = randomBytes(32);
    const id = keyIdOf(key);
    expect(id).toMatch(/^k[0-9a-f]{8}$/);
    expect(keyIdOf(Buffer.from(key))).toBe(id);
    expect(new Sealer(key).currentKeyId).toBe(id);
    expect(keyIdOf(randomBytes(32))).not.toBe(id);
    // No slice of the key's hex or base64 appears in the id.
    const hex = key.toString('hex');
    expect(hex).not.toContain(id.slice(1));
    expect(key.toString('base64')).not.toContain(id);
    // A known vector pins the derivation (first 8 hex of SHA-256 of the key).
    expect(keyIdOf(Buffer.alloc(32))).toBe('k66687aad');
  });
});

describe('secretFingerprint', () => {
  it('is 8 hex digits, deterministic per key and value, and differs between values', () => {
    const fk = randomBytes(32);
    const fp = secretFingerprint(fk, 'hunter2');
    expect(fp).toMatch(/^[0-9a-f]{8}$/);
    expect(secretFingerprint(fk, 'hunter2')).toBe(fp);
    expect(secretFingerprint(fk, 'hunter3')).not.toBe(fp);
    expect(secretFingerprint(fk, '')).toMatch(/^[0-9a-f]{8}$/);
  });

  it('is keyed: another key gives another fingerprint, and it is not a plain hash of the value', () => {
    const value = 'password1';
    const a = secretFingerprint(randomBytes(32), value);
    const b = secretFingerprint(randomBytes(32), value);
    expect(a).not.toBe(b);
    for (const alg of ['sha256', 'sha1', 'md5']) {
      expect(createHash(alg).update(value).digest('hex')).not.toContain(a);
    }
    expect(a).not.toContain(value);
  });
});
