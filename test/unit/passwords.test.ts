import { describe, expect, it } from 'vitest';
import { DEFAULT_SCRYPT, hashPassword, needsRehash, verifyPassword } from '../../src/lib/passwords.ts';

const STORED = /^scrypt\$n=32768,r=8,p=1\$([A-Za-z0-9_-]{22})\$([A-Za-z0-9_-]{43})$/;

describe('password hashing', () => {
  it('hashes as scrypt$n=32768,r=8,p=1$<16-byte salt>$<32-byte key>, salted afresh each time', async () => {
    const pw = 'correct horse battery staple';
    const [a, b] = await Promise.all([hashPassword(pw), hashPassword(pw)]);
    expect(a).toMatch(STORED);
    expect(b).toMatch(STORED);
    expect(a).not.toBe(b);
    expect(STORED.exec(a)![1]).not.toBe(STORED.exec(b)![1]);
    expect(a).not.toContain(pw);
    expect(DEFAULT_SCRYPT).toEqual({ n: 32768, r: 8, p: 1 });
  });

  it('verifies the right password and refuses a wrong one', async () => {
    const stored = await hashPassword('the right password');
    expect(await verifyPassword('the right password', stored)).toBe(true);
    expect(await verifyPassword('the right passworD', stored)).toBe(false);
    expect(await verifyPassword('the right password ', stored)).toBe(false);
    expect(await verifyPassword('', stored)).toBe(false);
  });

  it('refuses every password for an unknown account (null hash), the dummy hash included', async () => {
    // The unknown-account path runs the same scrypt against a dummy; whatever is typed, it never succeeds.
    expect(await verifyPassword('anything at all', null)).toBe(false);
    expect(await verifyPassword('', null)).toBe(false);
  });

  it('answers false, without throwing, for a malformed stored hash', async () => {
    const good = await hashPassword('some password here');
    const [, , salt, key] = good.split('$');
    const malformed = [
      '',
      'not a hash',
      `bcrypt$n=32768,r=8,p=1$${salt}$${key}`,
      `scrypt$n=32768,r=8$${salt}$${key}`,
      `scrypt$n=32768,r=8,p=1$${salt}`,
      `scrypt$n=32768,r=8,p=1$${salt}$${key}$extra`,
      `scrypt$n=32768,r=8,p=1$${salt}$${key}!`,
      `scrypt$n=abc,r=8,p=1$${salt}$${key}`,
    ];
    for (const stored of malformed) {
      await expect(verifyPassword('some password here', stored), stored).resolves.toBe(false);
      expect(needsRehash(stored), stored).toBe(true);
    }
    // Well-formed but with a truncated key: it must not compare equal to a prefix of the derived key.
    await expect(verifyPassword('some password here', `scrypt$n=32768,r=8,p=1$${salt}$${key!.slice(0, 20)}`)).resolves.toBe(false);
  });

  it('refuses absurd cost parameters instead of running them (memory exhaustion)', async () => {
    const good = await hashPassword('pw for params');
    const [, , salt, key] = good.split('$');
    for (const params of [
      'n=2097152,r=8,p=1', // 2^21: above the 2^20 ceiling
      'n=1073741824,r=8,p=1',
      'n=512,r=8,p=1', // below the floor
      'n=30000,r=8,p=1', // not a power of two
      'n=32768,r=33,p=1',
      'n=32768,r=8,p=17',
      'n=32768,r=1024,p=1',
    ]) {
      const stored = `scrypt$${params}$${salt}$${key}`;
      await expect(verifyPassword('pw for params', stored), params).resolves.toBe(false);
      expect(needsRehash(stored), params).toBe(true);
    }
  });

  it('normalises to NFKC, so composed/decomposed and compatibility forms of one password match', async () => {
    const composed = 'Caf\u00e9-\u00c5ngstr\u00f6m-\ufb01le'; // é, Å, ö precomposed; the "ﬁ" ligature
    const decomposed = 'Cafe\u0301-A\u030angstro\u0308m-file';
    expect(composed).not.toBe(decomposed);
    const stored = await hashPassword(composed);
    expect(await verifyPassword(decomposed, stored)).toBe(true);
    expect(await verifyPassword(composed, stored)).toBe(true);
    expect(await verifyPassword('Cafe-Angstrom-file', stored)).toBe(false);
  });

  it('needsRehash is false for today’s parameters and true for any other', async () => {
    expect(needsRehash(await hashPassword('current params pw'))).toBe(false);
    const older = await hashPassword('older params pw', { n: 16384, r: 8, p: 1 });
    expect(older).toMatch(/^scrypt\$n=16384,r=8,p=1\$/);
    expect(await verifyPassword('older params pw', older)).toBe(true);
    expect(needsRehash(older)).toBe(true);
    expect(needsRehash(await hashPassword('r differs pw', { n: 32768, r: 4, p: 1 }))).toBe(true);
    expect(needsRehash(await hashPassword('p differs pw', { n: 1024, r: 8, p: 2 }))).toBe(true);
    // Against a raised target, today's hash is the old one.
    expect(needsRehash(await hashPassword('raised target pw'), { n: 65536, r: 8, p: 1 })).toBe(true);
  });
});
