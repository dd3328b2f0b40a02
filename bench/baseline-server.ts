/**
 * The intake benchmark's baseline: the least a webhook endpoint on this stack can do. A bare Hono route on
 * @hono/node-server that reads the JSON body and commits one INSERT through the postgres driver, with the service's
 * pool size (DB_POOL_MAX). It runs as its own process (the service offers no such route), started exactly like the
 * service (`node --import tsx`), on the same database; it prints the same banner so the same helper waits for it.
 *
 *   DATABASE_URL=… PORT=… DB_POOL_MAX=10 node --import tsx bench/baseline-server.ts
 *   POST /baseline {"webhook_request_id": "…", …} → 200 {"received":[{"id":"…"}]}
 *   POST /baseline-notify  the same INSERT plus a pg_notify in the same statement (so the same round trips): what
 *                          graphile-worker's add_job adds to every transaction that enqueues a job
 *
 * Diagnostic knob: BASELINE_PREPARE=false runs the INSERT unprepared, as drizzle-orm's postgres-js driver runs every
 * query (postgres.js then sends Parse/Describe and waits for the reply before Bind/Execute: two round trips).
 */
import { serve } from '@hono/node-server';
import { Hono } from 'hono';
import postgres from 'postgres';

const url = process.env.DATABASE_URL;
if (!url) throw new Error('DATABASE_URL is required');
const port = Number(process.env.PORT ?? 0);
const poolMax = Number(process.env.DB_POOL_MAX ?? 10);

const sql = postgres(url, {
  max: poolMax,
  onnotice: () => {},
  connect_timeout: 10,
  connection: { application_name: 'bench-baseline-server' },
  prepare: process.env.BASELINE_PREPARE !== 'false',
});
await sql.unsafe(`create table if not exists bench_baseline_inserts (
  id bigserial primary key,
  key text not null,
  body jsonb not null,
  received_at timestamptz not null default now()
)`);

const app = new Hono();
app.post('/baseline', async (c) => {
  const body = (await c.req.json()) as { webhook_request_id?: unknown };
  if (typeof body.webhook_request_id !== 'string') return c.json({ error: 'webhook_request_id missing' }, 400);
  const [row] = await sql<{ id: string }[]>`
    insert into bench_baseline_inserts (key, body) values (${body.webhook_request_id}, ${sql.json(body as never)})
    returning id`;
  return c.json({ received: [{ id: row!.id }] }, 200);
});
app.post('/baseline-notify', async (c) => {
  const body = (await c.req.json()) as { webhook_request_id?: unknown };
  if (typeof body.webhook_request_id !== 'string') return c.json({ error: 'webhook_request_id missing' }, 400);
  const [row] = await sql<{ id: string }[]>`
    with ins as (
      insert into bench_baseline_inserts (key, body) values (${body.webhook_request_id}, ${sql.json(body as never)})
      returning id)
    select id, pg_notify('bench_baseline', '') from ins`;
  return c.json({ received: [{ id: row!.id }] }, 200);
});

const server = serve({ fetch: app.fetch, port, hostname: '127.0.0.1' }, (info) => {
  console.log(`\nbaseline server (pool ${poolMax}) on ${new URL(url).host}`);
  console.log(`  API       http://127.0.0.1:${info.port}/v1`);
  console.log('  Ctrl-C to stop\n');
});

let stopping = false;
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    if (stopping) process.exit(1);
    stopping = true;
    server.close(() => {
      void sql.end({ timeout: 5 }).then(() => process.exit(0));
    });
    (server as { closeIdleConnections?: () => void }).closeIdleConnections?.();
  });
}
