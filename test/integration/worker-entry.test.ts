import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import worker from '../../src/worker.ts';
import { createTestEnv, type TestEnv } from '../helpers/db.ts';

/**
 * The Workers entry called as the platform calls it, with bindings as wrangler passes them: a `[vars]` value written
 * as a TOML number or boolean arrives as a number or boolean, not a string.
 */
let env: TestEnv;
const pending: Promise<unknown>[] = [];
const ctx = { waitUntil: (p: Promise<unknown>) => void pending.push(p) };

beforeAll(async () => {
  env = await createTestEnv();
});

afterAll(async () => {
  await Promise.allSettled(pending);
  await env?.close();
});

describe('Workers entry', () => {
  // First: a Worker keeps the configuration it settled on, and only a valid one is kept.
  it.each([
    ['no DSR_ENCRYPTION_KEY', { DSR_ENCRYPTION_KEY: undefined }, /^DSR_ENCRYPTION_KEY: /],
    ['an invalid LOG_LEVEL', { LOG_LEVEL: 'loud' }, /^LOG_LEVEL: /],
    // Cloudflare appends the client's address to any X-Forwarded-For the client sent: the first entry, which
    // TRUST_PROXY takes, would be the client's own choice, and the per-address login limit nothing.
    ['TRUST_PROXY=true', { TRUST_PROXY: 'true' }, /^TRUST_PROXY: .*CF-Connecting-IP/],
  ])('with %s, every request is a 503 in the error shape, naming no value', async (_, over: Record<string, unknown>, named) => {
    const logged: string[] = [];
    const spy = vi.spyOn(console, 'error').mockImplementation((line: string) => void logged.push(line));
    try {
      const bindings = { DATABASE_URL: env.url, DSR_DIGEST_KEY: env.deps.digestKey.toString('base64'), DSR_ENCRYPTION_KEY: env.encryptionKey.toString('base64'), ...over };
      const res = await worker.fetch(new Request('http://worker.local/v1/privacy/requests'), bindings, ctx);
      expect(res.status).toBe(503);
      expect(res.headers.get('retry-after')).toBe('60');
      const body = (await res.json()) as { error: { code: string; message: string; requestId: string } };
      expect(body.error).toEqual({ code: 'service_unavailable', message: expect.any(String), requestId: res.headers.get('x-request-id') });
      expect(JSON.stringify(body)).not.toMatch(/DSR_|LOG_LEVEL|loud|at .*\.ts/);
      const entry = logged.map((l) => JSON.parse(l) as { msg: string; problems: string[] }).find((e) => e.msg === 'invalid configuration');
      expect(entry!.problems.join(' ')).toMatch(named);
      expect(JSON.stringify(logged)).not.toContain(env.deps.digestKey.toString('base64'));
    } finally {
      spy.mockRestore();
    }
  });

  it('applies [vars] given as TOML numbers instead of dropping them for the defaults', async () => {
    const ws = await env.newWorkspace();
    const bindings = {
      DATABASE_URL: env.url,
      DSR_DIGEST_KEY: env.deps.digestKey.toString('base64'),
      DSR_ENCRYPTION_KEY: env.encryptionKey.toString('base64'),
      LOG_LEVEL: 'silent',
      BODY_LIMIT_BYTES: 64,
    };
    const body = JSON.stringify({ userId: 'u-vars', event: 'e', properties: { padding: 'x'.repeat(100) } });
    const res = await worker.fetch(
      new Request('http://worker.local/v1/track', {
        method: 'POST',
        headers: { authorization: `Bearer ${ws.ingestKey}`, 'content-type': 'application/json', 'content-length': String(body.length) },
        body,
      }),
      bindings,
      ctx,
    );
    expect(res.status).toBe(413);
  });
});
