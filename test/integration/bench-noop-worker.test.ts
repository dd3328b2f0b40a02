import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runnerSettings } from '../../src/jobs/worker.ts';
import { createTestEnv, type TestEnv } from '../helpers/db.ts';
import { childEnv, startService, type Service } from '../helpers/process.ts';

/**
 * The drain benchmark's baseline (bench/noop-worker.ts) is graphile-worker draining no-op jobs; its ratio means
 * something only if that graphile-worker runs as the service's worker does (same fetch batching and completion
 * batching, pool and poll interval), so that the two sides differ in their tasks alone.
 */
let env: TestEnv;
let proc: Service | undefined;

beforeAll(async () => {
  env = await createTestEnv();
});

afterAll(async () => {
  if (proc && proc.proc.exitCode === null && proc.proc.signalCode === null) {
    proc.proc.kill('SIGKILL');
    await proc.exited;
  }
  await env?.close();
});

describe('drain benchmark: no-op worker baseline', () => {
  it("runs graphile-worker with the service worker's settings and reports them with its result", async () => {
    await env.sql`select graphile_worker.add_job('noop', json_build_object('n', g)) from generate_series(1, 6) g`;
    proc = startService(
      childEnv({ DATABASE_URL: env.url, WORKER_CONCURRENCY: '2', NOOP_JOBS: '6' }),
      [],
      ['--import', 'tsx', 'bench/noop-worker.ts'],
    );
    const code = await proc.exited;
    expect(code, proc.output()).toBe(0);
    const m = /^RESULT (\{.*\})$/m.exec(proc.output());
    expect(m, proc.output()).not.toBeNull();
    const res = JSON.parse(m![1]!) as { jobs: number; settings?: unknown };
    expect(res.jobs).toBe(6);
    expect(res.settings).toEqual(runnerSettings(2));
    const [left] = await env.sql<{ n: number }[]>`select count(*)::int as n from graphile_worker.jobs`;
    expect(left!.n).toBe(0);
  });
});
