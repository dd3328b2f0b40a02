import { randomBytes } from 'node:crypto';
import { afterAll, describe, expect, it } from 'vitest';
import { newApp } from '../../src/app.ts';
import { parseEnv } from '../../src/config.ts';
import { createDatabase } from '../../src/db/client.ts';
import { createNodeDeps } from '../../src/deps-node.ts';
import { Sealer } from '../../src/lib/sealing.ts';
import { createLogger } from '../../src/lib/logger.ts';
import { freePort } from '../helpers/global-setup.ts';
import { LogCapture } from '../helpers/db.ts';

// Nothing listens on this port: every query fails to connect.
const port = await freePort();
const database = createDatabase(`postgres://nobody@127.0.0.1:${port}/nothing`, { max: 1 });
const logs = new LogCapture();
const deps = createNodeDeps({
  env: parseEnv({ BODY_LIMIT_BYTES: '1024', EXECUTE_MAX_ATTEMPTS: '1' }),
  database,
  digestKey: randomBytes(32),
  sealer: new Sealer(randomBytes(32)),
  logger: createLogger('debug', logs),
});
const app = newApp(deps);
afterAll(async () => {
  await deps.http.close();
  await database.close();
});

describe('database unreachable', () => {
  it('healthz answers 503 and says the database is unreachable', async () => {
    const res = await app.request('/healthz');
    expect(res.status).toBe(503);
    expect(await res.json()).toEqual({ status: 'degraded', database: 'unreachable' });
  });

  it('API calls fail fast with 503 service_unavailable and Retry-After, not a 500 or a hang', async () => {
    const started = Date.now();
    const res = await app.request('/v1/track', {
      method: 'POST',
      headers: { authorization: `Bearer dsr_ingest_${'a'.repeat(43)}`, 'content-type': 'application/json' },
      body: JSON.stringify({ userId: 'u1', event: 'e' }),
    });
    expect(res.status).toBe(503);
    expect(res.headers.get('retry-after')).toBe('5');
    const body = (await res.json()) as { error: { code: string } };
    expect(body.error.code).toBe('service_unavailable');
    expect(Date.now() - started).toBeLessThan(5_000);
    const logged = logs.lines.map((l) => JSON.parse(l)).filter((l) => l.msg === 'database unavailable');
    expect(logged.length).toBeGreaterThan(0);
    // The driver's code, dug out from under drizzle's wrapper.
    for (const l of logged) expect(l.errorCode).toBe('ECONNREFUSED');
  });
});
