/**
 * End-to-end latency: a signed DataGrail webhook received → the erasure committed → the fake DataGrail receives the
 * callback carrying the audit record id. One real service process (`src/main.ts --role all`: HTTP + graphile-worker,
 * WORKER_CONCURRENCY 4) and the fake on loopback, in this process, so both ends of every sample are read from one
 * clock: t0 just before the webhook POST, t1 when the fake has read the callback's body.
 *
 * Every round sends `tickets` webhooks at once, each for its own seeded user (a profile and `events` events), and
 * waits for all callbacks. Every sample is verified: 200 with the request id, request complete/erased, the callback
 * says completed with the request's audit record id and the right record count, the user's rows are gone, and the
 * ticket is delivered. Each ticket's time is split with the database's own timestamps (job start, audit record) to
 * show where it goes. For context, the same number of concurrent POSTs to bench/baseline-server.ts (one INSERT per
 * request, separate process, same runtime and pool size) gives the floor of a loopback HTTP POST + one commit.
 */
import { randomUUID } from 'node:crypto';
import os from 'node:os';
import {
  DATAGRAIL_CALLBACK_ROUTE,
  FAKE_DATAGRAIL_API_KEY,
  FAKE_DATAGRAIL_WEBHOOK_SECRET,
  datagrailBody,
  datagrailWebhook,
  startFakeDataGrail,
} from '../connectors/datagrail/fake.ts';
import { createWorkspace } from '../src/accounts/workspaces.ts';
import { createDatabase } from '../src/db/client.ts';
import { migrateDatabase } from '../src/db/migrate.ts';
import { createLogger } from '../src/lib/logger.ts';
import { freePort } from '../src/lib/net.ts';
import {
  cpuMs,
  createBenchDataGrail,
  Databases,
  epochMs,
  fmtInt,
  intEnv,
  loadAvg,
  median,
  percentile,
  postgresCpuMs,
  postText,
  seconds,
  seedUsers,
  serviceEnv,
  sleep,
  deadline,
  spawnChild,
  WaitSampler,
  stopAndCheck,
  VerificationError,
  type Figure,
} from './lib.ts';
import type { BenchContext } from './run.ts';

const TARGET_P50_MS = 100;
const TARGET_P99_MS = 500;
/** Tickets sent one at a time after each round (each waits for its callback): the pipeline with no queue. */
const SOLO_PER_ROUND = 3;

interface Sample {
  round: number;
  /** t1 − t0: webhook POST to callback received. */
  totalMs: number;
  /** Webhook answered (ticket, request and job committed). */
  ackMs: number;
  /** Webhook answer → the job set the request running (database clock). */
  pickupMs: number;
  /** Job start → audit record appended (the erasure itself, before its commit). */
  executeMs: number;
  /** Audit record → callback received: commit, report job enqueue + pick-up, the outbound POST. */
  reportMs: number;
  /** Position of this ticket's execute job among the round's (by start time), 1-based. */
  startRank: number;
}

interface Arrival {
  at: number;
  json: { webhook_request_id?: string; status?: string; audit_record_id?: string; records_found?: number };
  authorized: boolean;
}

export async function runE2eBench(ctx: BenchContext): Promise<Figure[]> {
  const rounds = intEnv('BENCH_E2E_ROUNDS', 5, 2);
  const perRound = intEnv('BENCH_E2E_TICKETS', 20, 10);
  const eventsPerUser = intEnv('BENCH_E2E_EVENTS', 1000, 200);
  // Rounds run and discarded first. A service in production has long since compiled its hot paths; a fresh process
  // runs them unoptimised for its first few dozen tickets (V8 compiles in the background, on the same two cores):
  // rounds 1–4 of a 12-round run were 10–30% slower than the rest.
  const warmupRounds = intEnv('BENCH_E2E_WARMUP', 3, 1, 0);
  // Rounds run after the measured ones with PostgreSQL's wait events sampled (every 20 ms), for the log only: the
  // sampling costs the database CPU, and measured rounds with it on were 3–8 ms slower at p50 (4 of 4 pairs).
  const diagnosticRounds = intEnv('BENCH_E2E_DIAG_ROUNDS', 2, 1, 0);
  // For experiments only (the reference run uses the service default): how the burst responds to more job slots.
  // BENCH_E2E_ROLES=split: the deployment the README gives for production, a web process and a worker process
  // (`--role web` + `--role worker`), instead of one `--role all` process.
  const split = process.env.BENCH_E2E_ROLES === 'split';
  const workerConcurrency = intEnv('BENCH_E2E_WORKER_CONCURRENCY', Number(serviceEnv('').WORKER_CONCURRENCY));

  const server = await ctx.server();
  console.log(`# e2e benchmark — node ${process.version} · ${server.version.split(' on ')[0]} · ${server.mode}`);
  console.log(`machine: ${os.cpus().length} CPUs, load average ${loadAvg()} at start (other load skews timings)`);
  console.log(
    `${rounds} round(s) × ${perRound} DataGrail webhooks at once (after ${warmupRounds} warm-up round(s), discarded); each user ` +
      `${fmtInt(eventsPerUser)} events; service ${split ? 'role web + role worker (two processes)' : 'role all'}, WORKER_CONCURRENCY ${workerConcurrency}, REPORT_* defaults`,
  );

  const dbs = new Databases(server, ctx, 'e2e');
  const { name: datname, url } = await dbs.fresh('db');
  await migrateDatabase(url, createLogger('silent'));
  const database = createDatabase(url, { max: 2, applicationName: 'dsr-bench-e2e' });
  ctx.cleanup.add('close e2e bench pool', () => database.close());
  const sql = database.sql;
  const ws = await createWorkspace(database.db, { name: 'Bench: e2e' });
  let t = performance.now();
  const users = await seedUsers(
    sql,
    ws.workspaceId,
    'e2e-user-',
    (rounds + warmupRounds + diagnosticRounds) * perRound + rounds * SOLO_PER_ROUND,
    eventsPerUser,
  );
  let nextUser = 0;
  const takeUsers = (n: number) => users.slice(nextUser, (nextUser += n));
  await sql`vacuum (analyze)`;
  console.log(`seeded ${fmtInt(users.length)} users × ${fmtInt(eventsPerUser)} events in ${seconds(performance.now() - t)}`);

  const dg = await startFakeDataGrail();
  ctx.cleanup.add('stop fake DataGrail', () => dg.fake.stop());
  const arrivals = new Map<string, Arrival>();
  const waiters = new Map<string, () => void>();
  dg.fake.on(DATAGRAIL_CALLBACK_ROUTE, (call) => {
    const at = epochMs();
    const json = (call.json ?? {}) as Arrival['json'];
    const authorized = call.headers.authorization === `Bearer ${FAKE_DATAGRAIL_API_KEY}`;
    if (json.webhook_request_id && !arrivals.has(json.webhook_request_id)) {
      arrivals.set(json.webhook_request_id, { at, json, authorized });
      waiters.get(json.webhook_request_id)?.();
    }
    return authorized ? { status: 200, body: { success: true } } : { status: 401, body: { error: 'unauthorized' } };
  });

  const shared = serviceEnv(url, { WORKER_CONCURRENCY: String(workerConcurrency) }); // one set of keys for both
  const roleEnv = async () => ({ ...shared, PORT: String(await freePort()) });
  const service = await spawnChild(ctx, split ? 'service (role web)' : 'service (role all)', await roleEnv(), [
    '--role',
    split ? 'web' : 'all',
  ]);
  const worker = split ? await spawnChild(ctx, 'service (role worker)', await roleEnv(), ['--role', 'worker']) : undefined;
  const baseline = await spawnChild(
    ctx,
    'baseline server',
    { DATABASE_URL: url, PORT: String(await freePort()), DB_POOL_MAX: serviceEnv(url).DB_POOL_MAX },
    [],
    ['--import', 'tsx', 'bench/baseline-server.ts'],
  );
  const connector = await createBenchDataGrail(service.base, ws.adminKey);

  /** One round: a webhook for each of `roundUsers` at once; resolves with verified samples. */
  async function ticketRound(round: number, roundUsers: string[]): Promise<Sample[]> {
    const batch = roundUsers.map((userId) => {
      const id = randomUUID();
      const w = datagrailWebhook({
        secret: FAKE_DATAGRAIL_WEBHOOK_SECRET,
        body: datagrailBody({
          webhook_request_id: id,
          identifiers: { user_id: userId, email: `${userId}@example.test` },
          callback_url: dg.callbackUrl(),
        }),
      });
      const arrived = new Promise<void>((resolve) => waiters.set(id, resolve));
      return { id, userId, w, arrived };
    });
    const sent = await Promise.all(
      batch.map(async (b) => {
        const t0 = epochMs();
        const res = await postText(`${service.base}${connector.webhookPath}`, b.w.headers, b.w.rawBody);
        const tAck = epochMs();
        const text = res.text;
        if (res.status !== 200) throw new VerificationError(`webhook: ${res.status} ${text.slice(0, 300)}`);
        const requestId = (JSON.parse(text) as { received: { requestId: string }[] }).received[0]!.requestId;
        return { ...b, t0, tAck, requestId };
      }),
    );
    if ((await Promise.race([Promise.all(sent.map((s) => s.arrived)), deadline(30_000)])) === 'timeout') {
      const missing = sent.filter((s) => !arrivals.has(s.id)).length;
      throw new VerificationError(`round ${round}: ${missing} of ${sent.length} callbacks not received within 30 s`);
    }
    for (const s of sent) waiters.delete(s.id);

    const requestIds = sent.map((s) => s.requestId);
    // The delivery is recorded in a transaction that starts once the callback has been answered: wait for it.
    for (let i = 0; i < 100; i++) {
      const [p] = await sql<{ n: number }[]>`
        select count(*)::int as n from upstream_tickets where request_id = any(${requestIds}) and status <> 'delivered'`;
      if (p!.n === 0) break;
      await sleep(20);
    }
    const rows = await sql<
      {
        id: string;
        status: string;
        outcome: string | null;
        attempts: number;
        audit_record_id: string | null;
        started_ms: number;
        finished_ms: number;
        ticket_status: string | null;
      }[]
    >`
      select r.id, r.status, r.outcome, r.attempts, r.audit_record_id,
             extract(epoch from r.started_at)::float8 * 1000 as started_ms,
             extract(epoch from r.finished_at)::float8 * 1000 as finished_ms,
             (select t.status from upstream_tickets t where t.request_id = r.id) as ticket_status
      from dsr_requests r where r.id = any(${requestIds})`;
    const [left] = await sql<{ n: number }[]>`
      select ((select count(*) from end_users u where u.workspace_id = ${ws.workspaceId}
                 and u.external_id = any(${sent.map((s) => s.userId)}))
              + (select count(*) from events e join end_users u on u.id = e.user_id
                 where u.workspace_id = ${ws.workspaceId} and u.external_id = any(${sent.map((s) => s.userId)})))::int as n`;
    const byId = new Map(rows.map((r) => [r.id, r]));
    const starts = [...rows].sort((a, b) => a.started_ms - b.started_ms).map((r) => r.id);
    if (left!.n !== 0) throw new VerificationError(`round ${round}: ${left!.n} rows of the round's users left`);
    return sent.map((s) => {
      const r = byId.get(s.requestId);
      const a = arrivals.get(s.id)!;
      const problem = !r
        ? 'request missing'
        : r.status !== 'complete' || r.outcome !== 'erased' || r.attempts !== 1
          ? `request ${r.status}/${r.outcome} after ${r.attempts} attempt(s)`
          : !a.authorized
              ? 'callback without the API key'
              : a.json.status !== 'completed' || a.json.audit_record_id !== r.audit_record_id
                ? `callback ${JSON.stringify(a.json)} does not carry audit record ${r.audit_record_id}`
                : a.json.records_found !== 1 + eventsPerUser
                  ? `callback records_found ${a.json.records_found}, expected ${1 + eventsPerUser}`
                  : r.ticket_status !== 'delivered'
                    ? `ticket ${r.ticket_status}`
                    : undefined;
      if (problem) throw new VerificationError(`round ${round}, ticket ${s.id}: ${problem}`);
      return {
        round,
        totalMs: a.at - s.t0,
        ackMs: s.tAck - s.t0,
        pickupMs: r!.started_ms - s.tAck,
        executeMs: r!.finished_ms - r!.started_ms,
        reportMs: a.at - r!.finished_ms,
        startRank: starts.indexOf(s.requestId) + 1,
      };
    });
  }

  /** The same number of concurrent POSTs to the one-INSERT baseline route. */
  async function floorRound(): Promise<{ concurrent: number[]; single: number[] }> {
    const post = async () => {
      const key = randomUUID();
      const w = datagrailWebhook({
        secret: FAKE_DATAGRAIL_WEBHOOK_SECRET,
        body: datagrailBody({ webhook_request_id: key, identifiers: { user_id: `floor-${key}` } }),
      });
      const t0 = epochMs();
      const res = await postText(`${baseline.base}/baseline`, w.headers, w.rawBody);
      const ms = epochMs() - t0;
      if (res.status !== 200) throw new VerificationError(`baseline: ${res.status}`);
      return ms;
    };
    const concurrent = await Promise.all(Array.from({ length: perRound }, post));
    const single: number[] = [];
    for (let i = 0; i < 5; i++) single.push(await post());
    return { concurrent, single };
  }

  t = performance.now();
  for (let w = 0; w < warmupRounds; w++) {
    await ticketRound(0, takeUsers(perRound));
    await floorRound();
  }
  console.log(
    `  warm-up: ${warmupRounds} round(s) of ${perRound} tickets + baseline POSTs, discarded (${seconds(performance.now() - t)})`,
  );

  const samples: Sample[] = [];
  const solo: Sample[] = [];
  const floorConcurrent: number[] = [];
  const floorSingle: number[] = [];
  // CPU spent during the bursts (each process's own count): where a ticket's cost lands on this machine.
  const burstCpu = { service: 0, postgres: 0, bench: 0 };
  const servicePids = [service.pid, ...(worker ? [worker.pid] : [])];
  const cpuNow = () => ({
    service: servicePids.reduce((sum, pid) => sum + (cpuMs(pid) ?? 0), 0),
    postgres: postgresCpuMs(),
    bench: (process.cpuUsage().user + process.cpuUsage().system) / 1000,
  });
  for (let round = 1; round <= rounds; round++) {
    if (ctx.interrupted()) return [];
    await dbs.checkpoint();
    const before = cpuNow();
    const s = await ticketRound(round, takeUsers(perRound));
    const after = cpuNow();
    for (const k of ['service', 'postgres', 'bench'] as const) burstCpu[k] += after[k] - before[k];
    samples.push(...s);
    for (let i = 0; i < SOLO_PER_ROUND; i++) solo.push(...(await ticketRound(round, takeUsers(1))));
    const f = await floorRound();
    floorConcurrent.push(...f.concurrent);
    floorSingle.push(...f.single);
    const tot = s.map((x) => x.totalMs);
    console.log(
      `  round ${round}/${rounds}: ${s.length} tickets verified — webhook→callback p50 ${tot.length ? percentile(tot, 50).toFixed(0) : '-'} ms, ` +
        `max ${Math.max(...tot).toFixed(0)} ms; baseline POST (${perRound} at once) p50 ${median(f.concurrent).toFixed(1)} ms`,
    );
    await sleep(200);
  }
  // Diagnostic rounds: the same bursts with the database's wait events sampled; their timings are not figures.
  // None (BENCH_E2E_DIAG_ROUNDS=0, e.g. while profiling): no sampler either.
  const waits = diagnosticRounds > 0 ? new WaitSampler(server.adminUrl, datname, 20) : undefined;
  if (waits) ctx.cleanup.add('stop wait sampler', () => waits.stop().then(() => {}));
  const diagnostic: number[] = [];
  for (let d = 1; d <= diagnosticRounds; d++) {
    if (ctx.interrupted()) return [];
    await dbs.checkpoint();
    diagnostic.push(...(await ticketRound(rounds + d, takeUsers(perRound))).map((x) => x.totalMs));
    await sleep(200);
  }
  const waitSummary = waits ? await waits.stop() : 'not sampled (no diagnostic rounds)';
  if (diagnosticRounds > 0) {
    console.log(
      `  ${diagnosticRounds} diagnostic round(s) with wait sampling (not in the figures): ${diagnostic.length} tickets verified, ` +
        `p50 ${diagnostic.length ? percentile(diagnostic, 50).toFixed(0) : '-'} ms`,
    );
  }
  const [left] = await sql<{ n: number }[]>`
    select count(*)::int as n from graphile_worker.jobs where task_identifier in ('execute_request', 'report_upstream')`;
  if (left!.n !== 0) throw new VerificationError(`${left!.n} execute/report jobs left in the queue`);
  await stopAndCheck(service, split ? 'service (role web)' : 'service (role all)');
  if (worker) await stopAndCheck(worker, 'service (role worker)');
  await stopAndCheck(baseline, 'baseline server');

  const pick = (k: keyof Omit<Sample, 'round'>) => samples.map((s) => s[k]);
  const row = (label: string, xs: number[]) =>
    `| ${label} | ${percentile(xs, 50).toFixed(1)} | ${percentile(xs, 95).toFixed(1)} | ${percentile(xs, 99).toFixed(1)} | ${Math.max(...xs).toFixed(1)} |`;
  console.log(`\nPer ticket (${samples.length} samples; ms):\n`);
  console.log(
    [
      '| stage | p50 | p95 | p99 | max |',
      '|---|---:|---:|---:|---:|',
      row('**webhook POST → callback with audit id received**', pick('totalMs')),
      row('webhook answered (ticket + request + job committed)', pick('ackMs')),
      row('answer → job running (queue wait; worker pick-up)', pick('pickupMs')),
      row('job running → audit record appended (erase)', pick('executeMs')),
      row('audit record → callback received (commit, report job, POST)', pick('reportMs')),
      row(`one ticket alone (${solo.length} samples): webhook POST → callback`, solo.map((x) => x.totalMs)),
      row('one ticket alone: webhook answered', solo.map((x) => x.ackMs)),
      row('one ticket alone: answer → job running', solo.map((x) => x.pickupMs)),
      row('one ticket alone: erase', solo.map((x) => x.executeMs)),
      row('one ticket alone: audit record → callback received', solo.map((x) => x.reportMs)),
      row(`baseline: 1 POST + 1 INSERT commit, ${perRound} at once`, floorConcurrent),
      row('baseline: 1 POST + 1 INSERT commit, alone', floorSingle),
    ].join('\n'),
  );
  // By start order: the first job of a round shows the wake-up latency, the last one the queueing behind the others.
  const ranks = [...new Set(samples.map((s) => s.startRank))].sort((a, b) => a - b);
  const firstAndLast = [ranks[0]!, ranks[Math.min(3, ranks.length - 1)]!, ranks[Math.min(4, ranks.length - 1)]!, ranks[ranks.length - 1]!];
  console.log('\nBy the order in which the round\'s execute jobs started (median over rounds, ms):\n');
  console.log(
    [
      '| start rank | total | pick-up wait | erase | audit → callback |',
      '|---:|---:|---:|---:|---:|',
      ...[...new Set(firstAndLast)].map((rank) => {
        const of = samples.filter((s) => s.startRank === rank);
        const m = (k: keyof Omit<Sample, 'round'>) => median(of.map((s) => s[k])).toFixed(1);
        return `| ${rank} | ${m('totalMs')} | ${m('pickupMs')} | ${m('executeMs')} | ${m('reportMs')} |`;
      }),
    ].join('\n'),
  );
  console.log(
    `\nPostgreSQL sessions of the service during the diagnostic rounds (sampled every 20 ms): ${waitSummary}`,
  );
  const perTicket = (ms: number) => (ms / samples.length).toFixed(1);
  console.log(
    `CPU per ticket during the bursts (ms): service ${perTicket(burstCpu.service)}, PostgreSQL ${perTicket(burstCpu.postgres)}, ` +
      `this process (load, fake vendor, checks) ${perTicket(burstCpu.bench)}; ${os.cpus().length} cores`,
  );
  console.log(`\nload average at end: ${loadAvg()}`);

  const total = pick('totalMs');
  const p50 = percentile(total, 50);
  const p99 = percentile(total, 99);
  const floor = median(floorConcurrent);
  await dbs.finish();
  return [
    {
      bench: 'e2e',
      what: `webhook → erasure → callback with audit id, p50 (${samples.length} tickets, ${perRound} at once)`,
      result: `${p50.toFixed(0)} ms`,
      baseline: `${floor.toFixed(1)} ms (context: 1 POST + 1 INSERT, ${perRound} at once)`,
      ratioOrTarget: `< ${TARGET_P50_MS} ms`,
      pass: p50 < TARGET_P50_MS,
    },
    {
      bench: 'e2e',
      what: 'same (burst), p95',
      result: `${percentile(total, 95).toFixed(0)} ms`,
      baseline: `${percentile(floorConcurrent, 95).toFixed(1)} ms (context)`,
      ratioOrTarget: '—',
      pass: null,
    },
    {
      bench: 'e2e',
      what: 'same (burst), p99',
      result: `${p99.toFixed(0)} ms`,
      baseline: `${percentile(floorConcurrent, 99).toFixed(1)} ms (context)`,
      ratioOrTarget: `< ${TARGET_P99_MS} ms`,
      pass: p99 < TARGET_P99_MS,
    },
    {
      bench: 'e2e',
      what: `context: one ticket alone, nothing queued, p50 (${solo.length} tickets)`,
      result: `${percentile(solo.map((x) => x.totalMs), 50).toFixed(0)} ms`,
      baseline: `${median(floorSingle).toFixed(1)} ms (context: 1 POST + 1 INSERT, alone)`,
      ratioOrTarget: '—',
      pass: null,
    },
  ];
}
