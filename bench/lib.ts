/**
 * Plumbing shared by the benchmarks: the PostgreSQL server of a run (one per `npm run bench`, shared by every
 * benchmark), throwaway databases, child service processes, memory readings, statistics and formatting.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import postgres from 'postgres';
import { request } from 'undici';
import { parseEnv } from '../src/config.ts';
import { withDatabase, type Database } from '../src/db/client.ts';
import { createNodeDeps } from '../src/deps-node.ts';
import type { AppDeps } from '../src/http/env.ts';
import { createLogger, type Logger } from '../src/lib/logger.ts';
import { Sealer } from '../src/lib/sealing.ts';
import { quoteIdent, startEmbeddedPostgres } from '../src/db/embedded.ts';
import { freePort } from '../src/lib/net.ts';
import { childEnv, NPM_START_ARGS, startService, type Service } from '../test/helpers/process.ts';
import { FAKE_DATAGRAIL_API_KEY, FAKE_DATAGRAIL_WEBHOOK_SECRET } from '../connectors/datagrail/fake.ts';
import type { BenchContext } from './run.ts';

// ---------------------------------------------------------------------------------------------------------------
// Results

/** One row of the summary table printed at the end of a run. */
export interface Figure {
  bench: string;
  what: string;
  result: string;
  baseline: string;
  /** The ratio and its target, or the target alone; '—' for context figures. */
  ratioOrTarget: string;
  /** null: context only, nothing to pass. */
  pass: boolean | null;
}

export class VerificationError extends Error {}

// ---------------------------------------------------------------------------------------------------------------
// Settings

/** BENCH_QUICK=1: every benchmark shrinks to a smoke run (minutes → seconds); its figures are not the reference. */
export const QUICK = process.env.BENCH_QUICK === '1' || process.env.BENCH_QUICK === 'true';

/** An integer of at least `min` (1 unless given) from the environment; `quick` is the default under BENCH_QUICK. */
export function intEnv(name: string, fallback: number, quick = fallback, min = 1): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return QUICK ? quick : fallback;
  const v = Number(raw);
  if (!Number.isInteger(v) || v < min) {
    throw new Error(`${name} must be ${min === 1 ? 'a positive integer' : `an integer of at least ${min}`}`);
  }
  return v;
}

// ---------------------------------------------------------------------------------------------------------------
// Statistics and formatting

export const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

/** Nearest-rank percentile (p in 0–100): with 100 samples p99 is the 99th smallest. */
export function percentile(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
}

export const fmt = (ms: number) => ms.toFixed(0);
export const fmtInt = (n: number) => Math.round(n).toLocaleString('en-US');
export const fmtMb = (kb: number) => `${(kb / 1024).toFixed(0)} MB`;

export const loadAvg = () =>
  os
    .loadavg()
    .map((l) => l.toFixed(2))
    .join(' ');

/** The whole machine's CPU time so far, in clock ticks over all CPUs (Linux `/proc/stat`); undefined elsewhere. */
export interface MachineCpu {
  busy: number;
  /** Time the hypervisor gave this virtual machine's CPUs to someone else while they had work (steal). */
  steal: number;
  total: number;
}

export function machineCpu(): MachineCpu | undefined {
  let line: string;
  try {
    line = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!;
  } catch {
    return undefined;
  }
  if (!line.startsWith('cpu ')) return undefined;
  // user nice system idle iowait irq softirq steal (guest time is already inside user and nice)
  const [user, nice, system, idle, iowait, irq, softirq, steal] = line.trim().split(/\s+/).slice(1, 9).map(Number);
  if (steal === undefined || Number.isNaN(steal)) return undefined;
  const busy = user! + nice! + system! + irq! + softirq!;
  return { busy, steal, total: busy + idle! + iowait! + steal };
}

/**
 * How the machine's CPU time was spent between two readings: busy, and taken by the host (steal). Host contention
 * slows every process alike without showing in the load average, so absolute times (e2e latencies above all) move
 * with it while same-run ratios mostly do not.
 */
export function machineShare(from: MachineCpu | undefined, to: MachineCpu | undefined = machineCpu()): string {
  if (!from || !to || to.total <= from.total) return 'not available';
  const pct = (x: number) => `${((100 * x) / (to.total - from.total)).toFixed(1)} %`;
  return `${pct(to.busy - from.busy)} busy, ${pct(to.steal - from.steal)} taken by the host (steal)`;
}

export const seconds = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

/** Wall-clock milliseconds since the epoch with sub-millisecond resolution, comparable with database timestamps. */
export const epochMs = () => performance.timeOrigin + performance.now();

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A deadline to race against: resolves after `ms` but does not keep the process alive once nothing else does. */
export const deadline = (ms: number) => new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), ms).unref());

// ---------------------------------------------------------------------------------------------------------------
// The run's PostgreSQL server

export interface Server {
  adminUrl: string;
  mode: string;
  /** CREATE DATABASE … STRATEGY is PostgreSQL 15+. */
  versionNum: number;
  version: string;
  canCheckpoint: boolean;
}

/** DATABASE_URL's server, or a throwaway embedded cluster registered for removal. Use `ctx.server()` to share it. */
export async function openServer(ctx: BenchContext): Promise<Server> {
  let adminUrl = process.env.DATABASE_URL;
  let mode: string;
  if (adminUrl) {
    mode = `external server ${new URL(adminUrl).host} (DATABASE_URL; throwaway databases created and dropped)`;
  } else {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'dsr-bench-pg-'));
    ctx.cleanup.add('remove embedded data dir', () => rm(dir, { recursive: true, force: true }));
    const embedded = await startEmbeddedPostgres({
      dataDir: dir,
      port: await freePort(),
      // Durable settings (fsync, synchronous_commit, full_page_writes on): commit and WAL costs are real, and the
      // same for the measured side and its baseline.
      ephemeral: false,
      database: 'postgres',
    });
    ctx.cleanup.add('stop embedded PostgreSQL', () => embedded.stop());
    adminUrl = embedded.adminUrl;
    mode = 'embedded PostgreSQL (throwaway cluster, ephemeral: false — fsync/synchronous_commit/full_page_writes on)';
  }
  const admin = postgres(adminUrl, { max: 1, onnotice: () => {} });
  try {
    const [v] = await admin<{ version: string; num: string }[]>`
      select version() as version, current_setting('server_version_num') as num`;
    let canCheckpoint = true;
    try {
      await admin`checkpoint`;
    } catch {
      canCheckpoint = false;
    }
    return { adminUrl, mode, version: v!.version, versionNum: Number(v!.num), canCheckpoint };
  } finally {
    await admin.end({ timeout: 5 });
  }
}

/** Creates and drops the throwaway databases of one benchmark; all share one unique prefix. */
export class Databases {
  readonly prefix: string;
  private counter = 0;
  private admin: postgres.Sql;
  private dropRegistered: () => Promise<void>;

  constructor(
    private server: Server,
    private ctx: BenchContext,
    tag: string,
  ) {
    this.prefix = `dsrbench_${tag}_${process.pid}_${randomBytes(3).toString('hex')}`;
    this.admin = postgres(server.adminUrl, { max: 1, onnotice: () => {} });
    ctx.cleanup.add('close admin connection', () => this.admin.end({ timeout: 5 }));
    // Safety net for anything a run did not drop itself (errors, Ctrl-C).
    this.dropRegistered = ctx.cleanup.add(`drop ${tag} bench databases`, () => this.dropAll());
  }

  url(name: string): string {
    return withDatabase(this.server.adminUrl, name);
  }

  async create(name: string, template?: string): Promise<string> {
    // Cleanup may already be dropping the prefix's databases: a new one would outlive it on an external server.
    if (this.ctx.interrupted()) throw new Error('interrupted');
    const strategy = template && this.server.versionNum >= 150000 ? ' strategy file_copy' : '';
    await this.admin.unsafe(
      `create database ${quoteIdent(name)}${template ? ` template ${quoteIdent(template)}${strategy}` : ''}`,
    );
    return this.url(name);
  }

  async clone(template: string): Promise<{ name: string; url: string }> {
    const name = `${this.prefix}_${++this.counter}`;
    return { name, url: await this.create(name, template) };
  }

  /** A new empty database with the prefix. */
  async fresh(suffix: string): Promise<{ name: string; url: string }> {
    const name = `${this.prefix}_${suffix}`;
    return { name, url: await this.create(name) };
  }

  async drop(name: string): Promise<void> {
    await this.admin.unsafe(`drop database if exists ${quoteIdent(name)} with (force)`);
  }

  async size(name: string): Promise<string> {
    const [r] = await this.admin<{ size: string }[]>`select pg_size_pretty(pg_database_size(${name})) as size`;
    return r!.size;
  }

  async checkpoint(): Promise<void> {
    if (this.server.canCheckpoint) await this.admin`checkpoint`;
  }

  async dropAll(): Promise<void> {
    const rows = await this.admin<{ datname: string }[]>`
      select datname from pg_database where datname like ${`${this.prefix}%`}`;
    for (const { datname } of rows) await this.drop(datname);
  }

  /** Drops every database of this benchmark now (the shared server lives on for the next benchmark). */
  finish(): Promise<void> {
    return this.dropRegistered();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Child processes

export interface Child {
  pid: number;
  /** Base URL from the start-up banner ('' for a worker). */
  base: string;
  output(): string;
  /** SIGINT, then SIGKILL after 15 s. Runs once (also from the cleanup registry). */
  stop(): Promise<void>;
  /** Resolves with the exit code (null when killed by a signal). */
  exited: Promise<number | null>;
}

/**
 * Starts a process the way test/helpers/process.ts does (by default exactly what `npm start` runs; output captured,
 * ready at the banner) and registers its shutdown in the cleanup registry before anything else can fail.
 */
export async function spawnChild(
  ctx: BenchContext,
  label: string,
  env: NodeJS.ProcessEnv,
  args: string[],
  entry?: string[],
): Promise<Child> {
  if (ctx.interrupted()) throw new Error('interrupted');
  const dataDir = await mkdtemp(path.join(os.tmpdir(), 'dsr-bench-proc-'));
  const removeDir = ctx.cleanup.add(`remove ${label} data dir`, () => rm(dataDir, { recursive: true, force: true }));
  // BENCH_CPU_PROF_DIR: every child writes a V8 CPU profile there when it exits (open it in Chrome DevTools).
  const profile = process.env.BENCH_CPU_PROF_DIR ? ['--cpu-prof', `--cpu-prof-dir=${process.env.BENCH_CPU_PROF_DIR}`] : [];
  const service: Service = startService(
    childEnv({ DATA_DIR: dataDir, ...env }),
    args,
    [...profile, ...(entry ?? NPM_START_ARGS)],
  );
  const stopStep = ctx.cleanup.add(`stop ${label} (pid ${service.proc.pid})`, async () => {
    if (service.proc.exitCode === null && service.proc.signalCode === null) {
      service.proc.kill('SIGINT');
      const done = await Promise.race([service.exited.then(() => true), deadline(15_000)]);
      if (done === 'timeout') {
        console.error(`${label} did not stop within 15 s of SIGINT: killing it`);
        service.proc.kill('SIGKILL');
        await service.exited;
      }
    }
    await removeDir();
  });
  const base = await service.ready.catch(async (err: unknown) => {
    await stopStep();
    throw err;
  });
  return {
    pid: service.proc.pid!,
    base,
    output: service.output,
    stop: stopStep,
    exited: service.exited,
  };
}

/** Stops a service process and checks it ended cleanly: exit code 0 and no error-level log line. */
export async function stopAndCheck(child: Child, label: string): Promise<void> {
  await child.stop();
  const code = await child.exited;
  const errors = errorLines(child.output());
  if (code !== 0 || errors.length > 0) {
    throw new VerificationError(
      `${label}: exit code ${code}, ${errors.length} error-level log line(s)\n${child.output().slice(-3000)}`,
    );
  }
}

/** The environment every service process of the benchmarks gets (besides its role's own settings). */
export function serviceEnv(databaseUrl: string, extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  return {
    DATABASE_URL: databaseUrl,
    HOST: '127.0.0.1',
    LOG_LEVEL: 'warn',
    OUTBOUND_ALLOW_PRIVATE_NETWORKS: 'true',
    // The documented defaults, written out: childEnv (test helper) lowers both for tests.
    DB_POOL_MAX: '10',
    WORKER_CONCURRENCY: '4',
    // Fresh keys per process unless the caller shares its own (drain seeds digests the worker must match).
    DSR_DIGEST_KEY: randomBytes(32).toString('base64'),
    DSR_ENCRYPTION_KEY: randomBytes(32).toString('base64'),
    ...extra,
  };
}

/** Error- and fatal-level log lines (pino levels 50 and 60) in a child's output. */
export function errorLines(output: string): string[] {
  return output.split('\n').filter((l) => /"level":(50|60)\b/.test(l));
}

// ---------------------------------------------------------------------------------------------------------------
// Memory

function statusKb(pid: number | 'self', field: 'VmRSS' | 'VmHWM'): number | undefined {
  try {
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Peak resident memory of a process over a window. VmHWM is the kernel's exact high-water mark; writing 5 to
 * clear_refs resets it to the current RSS, so the window's peak is read without the start-up's (`reset: false`
 * keeps the whole life instead). VmRSS is also sampled every `intervalMs` as a cross-check, and is the only figure
 * where clear_refs is not permitted.
 */
export class PeakRss {
  private sampledKb = 0;
  private timer: NodeJS.Timeout;
  readonly hwmReset: boolean;
  /** VmRSS when the window started (0 if it could not be read). */
  readonly startKb: number;
  /** VmHWM is meaningful: reset at the start, or deliberately covering the process's whole life. */
  private useHwm: boolean;

  constructor(
    private pid: number | 'self',
    opts: { intervalMs?: number; reset?: boolean } = {},
  ) {
    let reset = false;
    if (opts.reset !== false) {
      try {
        writeFileSync(`/proc/${pid}/clear_refs`, '5');
        reset = true;
      } catch {
        reset = false;
      }
    }
    this.hwmReset = reset;
    this.useHwm = reset || opts.reset === false;
    this.sample();
    this.startKb = this.sampledKb;
    this.timer = setInterval(() => this.sample(), opts.intervalMs ?? 100);
    this.timer.unref();
  }

  private sample(): void {
    const kb = statusKb(this.pid, 'VmRSS');
    if (kb !== undefined && kb > this.sampledKb) this.sampledKb = kb;
  }

  /** Stops sampling; `peakKb` is VmHWM when it could be reset, else the highest sample. */
  stop(): { peakKb: number; sampledKb: number; source: string } {
    this.sample();
    clearInterval(this.timer);
    const hwm = this.useHwm ? statusKb(this.pid, 'VmHWM') : undefined;
    const source = this.hwmReset ? 'VmHWM, reset at the window start' : 'VmHWM over the process life';
    return hwm !== undefined
      ? { peakKb: Math.max(hwm, this.sampledKb), sampledKb: this.sampledKb, source }
      : { peakKb: this.sampledKb, sampledKb: this.sampledKb, source: 'VmRSS sampled every 100 ms' };
  }
}

export const MEMORY_TARGET_MB = 250;

let clockTicks: number | undefined;

/** CPU time (user + system) a process has used so far, in ms; undefined where /proc is not readable. */
/** CPU time (user + system) of every process named `postgres` on this machine, in ms. */
export function postgresCpuMs(): number {
  let total = 0;
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      if (stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')')) !== 'postgres') continue;
      total += cpuMs(Number(entry)) ?? 0;
    } catch {
      // exited meanwhile
    }
  }
  return total;
}

export function cpuMs(pid: number): number | undefined {
  return statCpuMs(`/proc/${pid}/stat`);
}

/**
 * CPU time of a process's main thread (its event loop), in ms: without the threads of libuv's pool (WebCrypto, zlib,
 * file I/O) or V8's compiler and garbage-collector threads.
 */
export function mainThreadCpuMs(pid: number): number | undefined {
  return statCpuMs(`/proc/${pid}/task/${pid}/stat`);
}

function statCpuMs(path: string): number | undefined {
  try {
    clockTicks ??= Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    const stat = readFileSync(path, 'utf8');
    // Fields after the command name (which may hold spaces): state is the 3rd field, utime the 14th, stime the 15th.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return ((Number(rest[11]) + Number(rest[12])) * 1000) / clockTicks;
  } catch {
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Where PostgreSQL sessions wait

/**
 * Samples pg_stat_activity every `intervalMs` for one database's sessions that are inside a query or a
 * transaction, and tallies what each was doing: its wait event (`Lock:advisory`, `IO:WalSync`,
 * `Client:ClientRead` = waiting for the application's next message, …) or `CPU` when running without a wait.
 * Shows whether a run is bound by the database, by locks, or by the application.
 */
export class WaitSampler {
  private counts = new Map<string, number>();
  private samples = 0;
  private timer: NodeJS.Timeout;
  private busy = false;
  private sql: postgres.Sql;

  constructor(adminUrl: string, datname: string, intervalMs = 50) {
    this.sql = postgres(adminUrl, { max: 1, onnotice: () => {}, connection: { application_name: 'dsr-bench-waits' } });
    this.timer = setInterval(() => {
      if (this.busy) return;
      this.busy = true;
      this.sql<{ w: string; n: number }[]>`
        select case when state = 'active' and wait_event is null then 'CPU'
                    else coalesce(wait_event_type, '') || ':' || coalesce(wait_event, '') end
                 || case when state = 'idle in transaction' then ' (idle in transaction)' else '' end as w,
               count(*)::int as n
        from pg_stat_activity
        where datname = ${datname} and backend_type = 'client backend' and pid <> pg_backend_pid()
          and state in ('active', 'idle in transaction')
          and coalesce(application_name, '') not like 'dsr-bench%'
        group by 1`
        .then((rows) => {
          this.samples++;
          for (const r of rows) this.counts.set(r.w, (this.counts.get(r.w) ?? 0) + r.n);
        })
        .catch(() => {})
        .finally(() => (this.busy = false));
    }, intervalMs);
  }

  private stopped: Promise<string> | undefined;

  /** Stops (once); returns e.g. "3.1 busy sessions on average: Client:ClientRead 52%, IO:WalSync 20%, …". */
  stop(): Promise<string> {
    return (this.stopped ??= this.summarise());
  }

  private async summarise(): Promise<string> {
    clearInterval(this.timer);
    await this.sql.end({ timeout: 5 });
    const total = [...this.counts.values()].reduce((a, b) => a + b, 0);
    if (this.samples === 0 || total === 0) return 'no busy sessions sampled';
    const parts = [...this.counts]
      .sort((a, b) => b[1] - a[1])
      .slice(0, 6)
      .map(([w, n]) => `${w} ${((100 * n) / total).toFixed(0)}%`);
    return `${(total / this.samples).toFixed(1)} busy sessions on average: ${parts.join(', ')}`;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// HTTP

/** A JSON call to one of our processes; throws VerificationError on an unexpected status. */
export async function callJson<T>(
  base: string,
  method: string,
  urlPath: string,
  opts: { key?: string; body?: unknown; expect?: number } = {},
): Promise<T> {
  const res = await fetch(`${base}${urlPath}`, {
    method,
    headers: {
      ...(opts.key ? { authorization: `Bearer ${opts.key}` } : {}),
      ...(opts.body !== undefined ? { 'content-type': 'application/json' } : {}),
    },
    body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
  });
  const text = await res.text();
  if (res.status !== (opts.expect ?? 200)) {
    throw new VerificationError(`${method} ${urlPath}: ${res.status} ${text.slice(0, 300)}`);
  }
  return (text ? JSON.parse(text) : undefined) as T;
}

/** A DataGrail connector with the fake's secrets, allowed to call back to loopback, created through the admin API. */
export function createBenchDataGrail(base: string, adminKey: string): Promise<{ id: string; webhookPath: string }> {
  return callJson(base, 'POST', '/v1/admin/connectors', {
    key: adminKey,
    expect: 201,
    body: {
      vendor: 'datagrail',
      name: 'Bench DataGrail',
      config: { callbackHosts: ['127.0.0.1'] },
      secrets: { webhookSecret: FAKE_DATAGRAIL_WEBHOOK_SECRET, apiKey: FAKE_DATAGRAIL_API_KEY },
    },
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Seeding

const T0 = '2025-01-01T00:00:00Z';

/**
 * `users` profiles `${prefix}0…` (email `${prefix}N@example.test`) with `eventsPerUser` events each, the users'
 * events interleaved in time order as in production. Set-based SQL, one transaction; returns the external ids.
 */
export async function seedUsers(
  sql: postgres.Sql,
  workspaceId: string,
  prefix: string,
  users: number,
  eventsPerUser: number,
): Promise<string[]> {
  await sql.begin(async (tx) => {
    await tx`
      insert into end_users (workspace_id, external_id, email, email_normalized, display_name, plan, traits,
                             last_seen_at, created_at, updated_at)
      select ${workspaceId}, ${prefix} || g, ${prefix} || g || '@example.test', ${prefix} || g || '@example.test',
             'Bench User ' || g, 'free', '{"seats":1}', ${T0}::timestamptz, ${T0}::timestamptz, ${T0}::timestamptz
      from generate_series(0, ${users - 1}::int) g`;
    await tx`
      insert into events (workspace_id, user_id, name, properties, occurred_at, received_at)
      select ${workspaceId}, u.id, (array['page_view','click','search','feature_used'])[1 + e % 4],
             jsonb_build_object('path', '/app/page/' || (e % 100), 'value', e),
             ${T0}::timestamptz + e * interval '1 minute', ${T0}::timestamptz + e * interval '1 minute'
      from end_users u cross join generate_series(0, ${eventsPerUser - 1}::int) e
      where u.workspace_id = ${workspaceId} and u.external_id like ${`${prefix}%`}
      order by e, u.id`;
  });
  return Array.from({ length: users }, (_, i) => `${prefix}${i}`);
}

/**
 * One POST, its status and body text: undici's request API, which costs this process a fraction of what `fetch`
 * does (no web streams), so the load generator takes less of the CPU it shares with the service it measures.
 */
export async function postText(
  url: string,
  headers: Record<string, string>,
  body: string,
): Promise<{ status: number; text: string }> {
  const res = await request(url, { method: 'POST', headers, body });
  return { status: res.statusCode, text: await res.body.text() };
}

/** The service's dependencies over a bench database: default settings, the given keys, logging off unless given. */
export function benchDeps(
  database: Database,
  keys: { digestKey: Buffer; encryptionKey?: Buffer },
  logger: Logger = createLogger('silent'),
): AppDeps {
  const sealer = new Sealer(keys.encryptionKey ?? randomBytes(32));
  return createNodeDeps({ env: parseEnv({}), database, digestKey: keys.digestKey, sealer, logger });
}
