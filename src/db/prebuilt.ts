import * as drizzleOrm from 'drizzle-orm';
import { fillPlaceholders, is, Param, Placeholder, sql, type SQL } from 'drizzle-orm';
import { PgDialect } from 'drizzle-orm/pg-core';
import { drizzle } from 'drizzle-orm/postgres-js';
import type postgres from 'postgres';
import type { DbOrTx } from './client.ts';
import * as schema from './schema/index.ts';

/**
 * Statements on the hot path (webhook → erasure → report) built by drizzle once, with a placeholder for every value,
 * and run with values on any database handle or transaction. drizzle builds a query afresh on every call, and in the
 * end-to-end benchmark building was about a quarter of the service's CPU per ticket: more than sending, running and
 * reading the statements. The text and the result mapping are drizzle's own (its `prepare`), so a prebuilt query
 * returns exactly what the same builder chain would.
 */

/** A drizzle database without a connection: it only builds statements. */
const builder = drizzle.mock({ schema });
const dialect = new PgDialect();
export type Builder = typeof builder;

/**
 * A condition, always true, that turns synchronous commit off for the transaction of the statement it is part of
 * (the implicit one of a statement run on its own): its commit returns without waiting for the WAL to reach the disk.
 * Only for writes whose loss in a crash of the database server is harmless: the work is redone (the job that made
 * it runs again), and any later synchronous commit, such as the erasure's, makes it durable anyway, WAL being one
 * sequence. It changes nothing when the client process dies: the server has the commit.
 */
export const commitWithoutFlush = sql`(select set_config('synchronous_commit', 'off', true)) is not null`;

/** A named value filled in when the statement runs. */
export const p = (name: string) => sql.placeholder(name);

type Values = Record<string, unknown>;

/** drizzle's own row mapper: exported at run time, left out of its type declarations. */
type RowMapper = (fields: unknown, row: unknown[], joinsNotNullableMap?: Record<string, boolean>) => unknown;
const mapResultRow = (drizzleOrm as unknown as { mapResultRow?: RowMapper }).mapResultRow!;
if (typeof mapResultRow !== 'function') throw new Error('this drizzle-orm version does not export mapResultRow');

/** What drizzle's prepared query for postgres.js holds (its fields are not part of its typed surface). */
interface DrizzlePrepared {
  queryString: string;
  params: unknown[];
  fields?: unknown;
  joinsNotNullableMap?: Record<string, boolean>;
}

interface Preparable {
  prepare(name: string): { execute(values?: Values): Promise<unknown> };
}
type ResultOf<Q extends Preparable> = Awaited<ReturnType<ReturnType<Q['prepare']>['execute']>>;

/** The postgres.js handle behind a drizzle database or transaction (the transaction's own connection). */
export function clientOf(on: DbOrTx): postgres.Sql {
  return (on as unknown as { session: { client: postgres.Sql } }).session.client;
}

export class Prebuilt<R> {
  private built: DrizzlePrepared | undefined;

  constructor(private readonly build: () => DrizzlePrepared) {}

  /**
   * Sends the statement at once (statements started in a row go out in that order, which callers pipelining on a
   * transaction rely on) and resolves with what drizzle would return: mapped rows for a select or a returning clause,
   * the driver's result (with its `count`) otherwise.
   */
  run(on: DbOrTx, values: Values = {}): Promise<R> {
    const { queryString, params, fields, joinsNotNullableMap } = this.statement();
    let filled: unknown[];
    try {
      filled = fill(params, values);
    } catch (err) {
      return Promise.reject(err as Error); // a value the caller did not give (drizzle names the placeholder)
    }
    // Prepared per connection, unless the database handle was made with prepare off (a transaction-mode pooler):
    // postgres.js prepares only when both its own setting and the query ask for it.
    const query = clientOf(on).unsafe(queryString, filled as never[], { prepare: true });
    if (!fields) return query.execute() as unknown as Promise<R>;
    return query
      .values()
      .execute()
      .then((rows) => rows.map((row) => mapResultRow(fields, row as unknown[], joinsNotNullableMap))) as Promise<R>;
  }

  private statement(): DrizzlePrepared {
    return (this.built ??= this.build());
  }
}

/**
 * drizzle's fillPlaceholders, except that a null goes to the driver as null, as drizzle sends a null it is given
 * directly: its own version hands null to the column's encoder (a timestamp's calls toISOString on it).
 */
function fill(params: unknown[], values: Values): unknown[] {
  const nullsDirect = params.map((param) =>
    is(param, Param) && is(param.value, Placeholder) && values[param.value.name] === null ? null : param,
  );
  return fillPlaceholders(nullsDirect, values);
}

/** A query builder chain (select, insert, update, delete), built once on first use. */
export function prebuilt<Q extends Preparable>(build: (b: Builder) => Q): Prebuilt<ResultOf<Q>> {
  return new Prebuilt(() => build(builder).prepare('prebuilt') as unknown as DrizzlePrepared);
}

/** A statement written with drizzle's `sql` template; its rows come back as the driver returns them. */
export function prebuiltSql<Row extends Record<string, unknown>>(build: (b: Builder) => SQL): Prebuilt<postgres.RowList<Row[]>> {
  return new Prebuilt(() => {
    const query = dialect.sqlToQuery(build(builder));
    return { queryString: query.sql, params: query.params };
  });
}
