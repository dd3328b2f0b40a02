import { describe, expect, it } from 'vitest';
import { lockKey, normalizeEmail, subjectDigest, userLockKey, workspaceLockKey } from '../../src/lib/digest.ts';
import { newId } from '../../src/lib/ids.ts';

const key = Buffer.alloc(32, 1);

describe('subject digests', () => {
  it('normalise emails (trim, lowercase) but not user ids', () => {
    expect(normalizeEmail('  Ada@Example.COM \n')).toBe('ada@example.com');
    expect(subjectDigest(key, 'ws_a', 'email', ' Ada@Example.com')).toBe(subjectDigest(key, 'ws_a', 'email', 'ada@example.com'));
    expect(subjectDigest(key, 'ws_a', 'user_id', 'U1')).not.toBe(subjectDigest(key, 'ws_a', 'user_id', 'u1'));
  });

  it('are keyed, bound to the workspace and to the identifier kind, and hide the value', () => {
    const d = subjectDigest(key, 'ws_a', 'email', 'ada@example.com');
    expect(d).toMatch(/^[0-9a-f]{64}$/);
    expect(d).not.toContain('ada');
    expect(subjectDigest(Buffer.alloc(32, 2), 'ws_a', 'email', 'ada@example.com')).not.toBe(d);
    expect(subjectDigest(key, 'ws_b', 'email', 'ada@example.com')).not.toBe(d);
    expect(subjectDigest(key, 'ws_a', 'user_id', 'ada@example.com')).not.toBe(d);
  });
});

describe('advisory lock keys', () => {
  it('are deterministic signed 64-bit integers, distinct per workspace and user', () => {
    const k = userLockKey('ws_a', 'u1');
    expect(k).toBe(userLockKey('ws_a', 'u1'));
    expect(BigInt(k)).toBeGreaterThanOrEqual(-(2n ** 63n));
    expect(BigInt(k)).toBeLessThan(2n ** 63n);
    expect(userLockKey('ws_b', 'u1')).not.toBe(k);
    expect(workspaceLockKey('ws_a')).not.toBe(lockKey('user', 'ws_a', ''));
  });
});

describe('ids', () => {
  it('carry their prefix, sort by creation time and do not repeat', () => {
    const a = newId('req');
    expect(a).toMatch(/^req_[0-9a-z]{25}$/);
    const ids = Array.from({ length: 1000 }, () => newId('aud'));
    expect(new Set(ids).size).toBe(1000);
    const older = `req_${(Date.now() - 1000).toString(36).padStart(9, '0')}`;
    expect(older < a).toBe(true);
  });
});
