/**
 * Whole-database views for the security tests: a fingerprint of every table (to prove a refused call changed
 * nothing) and the full text of every row (to prove a value is stored nowhere in plaintext).
 */
import { expect } from 'vitest';
import { quoteIdent } from '../../src/db/embedded.ts';
import type { TestEnv } from '../helpers/db.ts';

/**
 * Columns a refused call may legitimately touch: authenticating a key or a session refreshes them (at most once a
 * minute), whether or not the call then succeeds.
 */
const VOLATILE_COLUMNS = new Set(['api_keys.last_used_at', 'admin_sessions.last_seen_at']);

/** The tables the security tests rely on: a snapshot missing one of them would prove nothing about it. */
const EXPECTED_TABLES = [
  'admin_sessions',
  'admin_users',
  'api_keys',
  'audit_records',
  'auth_throttle',
  'connectors',
  'dsr_requests',
  'end_users',
  'upstream_tickets',
  'webhook_tokens',
  'workspaces',
];

async function publicColumns(env: TestEnv): Promise<Map<string, string[]>> {
  const rows = await env.sql<{ table_name: string; column_name: string }[]>`
    select c.table_name, c.column_name
    from information_schema.columns c
    join information_schema.tables t on t.table_schema = c.table_schema and t.table_name = c.table_name
    where c.table_schema = 'public' and t.table_type = 'BASE TABLE'
    order by c.table_name, c.ordinal_position`;
  const byTable = new Map<string, string[]>();
  for (const r of rows) byTable.set(r.table_name, [...(byTable.get(r.table_name) ?? []), r.column_name]);
  for (const t of EXPECTED_TABLES) expect([...byTable.keys()], `table ${t}`).toContain(t);
  return byTable;
}

/**
 * Row count and md5 of every public table (volatile columns left out) and of graphile-worker's job table. Two equal
 * snapshots mean no row was inserted, updated or deleted anywhere in between. With `workspaceId`, only that
 * workspace's rows of the tables that name a workspace.
 */
export async function snapshot(env: TestEnv, opts: { workspaceId?: string } = {}): Promise<Record<string, string>> {
  await env.deps.outbox.idle(); // jobs on their way from the outbox to graphile-worker land first
  const out: Record<string, string> = {};
  for (const [table, columns] of await publicColumns(env)) {
    const scopeColumn = table === 'workspaces' ? 'id' : columns.includes('workspace_id') ? 'workspace_id' : undefined;
    if (opts.workspaceId && !scopeColumn) continue;
    const where = opts.workspaceId ? `where ${quoteIdent(scopeColumn!)} = $1` : '';
    const kept = columns.filter((c) => !VOLATILE_COLUMNS.has(`${table}.${c}`)).map(quoteIdent);
    const [row] = await env.sql.unsafe<{ n: number; h: string }[]>(
      `select count(*)::int as n, md5(coalesce(string_agg(r::text, E'\\n' order by r::text), '')) as h
       from (select ${kept.join(', ')} from public.${quoteIdent(table)} ${where}) r`,
      opts.workspaceId ? [opts.workspaceId] : [],
    );
    out[table] = `${row!.n} rows ${row!.h}`;
  }
  if (opts.workspaceId) return out;
  const [jobs] = await env.sql<{ n: number; h: string }[]>`
    select count(*)::int as n, md5(coalesce(string_agg(j::text, E'\n' order by j.id), '')) as h
    from graphile_worker._private_jobs j`;
  out['graphile_worker._private_jobs'] = `${jobs!.n} rows ${jobs!.h}`;
  return out;
}

/** Row counts of the tables a request, ticket, key, admin or session would land in. */
export async function rowCounts(env: TestEnv): Promise<Record<string, number>> {
  await env.deps.outbox.idle(); // jobs on their way from the outbox to graphile-worker land first
  const out: Record<string, number> = {};
  for (const table of (await publicColumns(env)).keys()) {
    const [row] = await env.sql.unsafe<{ n: number }[]>(`select count(*)::int as n from public.${quoteIdent(table)}`);
    out[table] = row!.n;
  }
  const [jobs] = await env.sql<{ n: number }[]>`select count(*)::int as n from graphile_worker._private_jobs`;
  out['graphile_worker._private_jobs'] = jobs!.n;
  return out;
}

export interface StoredText {
  /** `table.column`, or `graphile_worker._private_jobs.payload` / `.last_error`. */
  where: string;
  text: string;
}

/**
 * Every non-null value of every column of every public table, cast to text, plus graphile-worker's job payloads
 * and errors: what someone reading the database (or a dump of it) would see.
 */
export async function everyStoredValue(env: TestEnv): Promise<StoredText[]> {
  await env.deps.outbox.idle(); // jobs on their way from the outbox to graphile-worker land first
  const out: StoredText[] = [];
  for (const [table, columns] of await publicColumns(env)) {
    for (const column of columns) {
      const rows = await env.sql.unsafe<{ v: string }[]>(
        `select ${quoteIdent(column)}::text as v from public.${quoteIdent(table)} where ${quoteIdent(column)} is not null`,
      );
      for (const r of rows) out.push({ where: `${table}.${column}`, text: r.v });
    }
  }
  const jobs = await env.sql<{ payload: string; last_error: string | null; key: string | null }[]>`
    select payload::text as payload, last_error, key from graphile_worker._private_jobs`;
  for (const j of jobs) {
    out.push({ where: 'graphile_worker._private_jobs.payload', text: j.payload });
    if (j.last_error) out.push({ where: 'graphile_worker._private_jobs.last_error', text: j.last_error });
    if (j.key) out.push({ where: 'graphile_worker._private_jobs.key', text: j.key });
  }
  return out;
}

/** The places (table.column) where any of the needles occurs, case-insensitively. */
export function findIn(haystack: StoredText[], needles: Record<string, string>): string[] {
  const hits: string[] = [];
  for (const [name, needle] of Object.entries(needles)) {
    const n = needle.toLowerCase();
    for (const h of haystack) if (h.text.toLowerCase().includes(n)) hits.push(`${name} in ${h.where}`);
  }
  return [...new Set(hits)];
}

const fingerprintQueries = new WeakMap<TestEnv, Map<string, string>>();

/**
 * What `snapshot` compares, in one statement and one digest: for the fuzzing loops, which compare the whole database
 * before and after every case. Tables in `except` are left out (e.g. auth_throttle, which every login attempt
 * counts in, refused or not).
 */
export async function fingerprint(env: TestEnv, except: readonly string[] = []): Promise<string> {
  await env.deps.outbox.idle(); // jobs on their way from the outbox to graphile-worker land first
  let byEnv = fingerprintQueries.get(env);
  if (!byEnv) fingerprintQueries.set(env, (byEnv = new Map()));
  const cacheKey = [...except].sort().join(',');
  let query = byEnv.get(cacheKey);
  if (!query) {
    const parts: string[] = [];
    for (const [table, columns] of await publicColumns(env)) {
      if (except.includes(table)) continue;
      const kept = columns.filter((c) => !VOLATILE_COLUMNS.has(`${table}.${c}`)).map(quoteIdent);
      parts.push(
        `select '${table}' as t, count(*) || ' ' || md5(coalesce(string_agg(r::text, E'\\n' order by r::text), '')) as h
         from (select ${kept.join(', ')} from public.${quoteIdent(table)}) r`,
      );
    }
    parts.push(
      `select 'graphile_worker._private_jobs' as t, count(*) || ' ' || md5(coalesce(string_agg(j::text, E'\\n' order by j.id), '')) as h
       from graphile_worker._private_jobs j`,
    );
    query = `select string_agg(t || ': ' || h, E'\\n' order by t) as f from (${parts.join('\nunion all\n')}) x`;
    byEnv.set(cacheKey, query);
  }
  const [row] = await env.sql.unsafe<{ f: string }[]>(query);
  return row!.f;
}
