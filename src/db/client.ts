import { drizzle, type PostgresJsDatabase } from 'drizzle-orm/postgres-js';
import postgres from 'postgres';
import * as schema from './schema/index.ts';

export type Schema = typeof schema;
/** drizzle over postgres.js; `$client` is the driver (prepared by default, see preparedByDefault). */
export type Db = PostgresJsDatabase<Schema> & { $client: postgres.Sql };
/** A drizzle transaction handle (what `db.transaction` passes to its callback). */
export type Tx = Parameters<Parameters<Db['transaction']>[0]>[0];
export type DbOrTx = Db | Tx;

export interface Database {
  db: Db;
  sql: postgres.Sql;
  close(): Promise<void>;
}

export interface DatabaseOptions {
  max?: number;
  applicationName?: string;
  /**
   * Prepare parameterised statements once per connection (default). Off for a pooler that cannot keep prepared
   * statements across transactions (e.g. PgBouncer in transaction mode before 1.21).
   */
  prepare?: boolean;
}

export function createDatabase(url: string, opts: DatabaseOptions = {}): Database {
  const prepare = opts.prepare ?? true;
  const sql = postgres(url, {
    prepare,
    max: opts.max ?? 10,
    onnotice: () => {},
    connect_timeout: 10,
    // Reconnect quickly after the database comes back: the driver's default backoff grows to 20 s, and queries wait
    // for it, so a request would hang instead of getting its prompt 503.
    backoff: (attempt: number) => Math.min(0.05 * 2 ** attempt, 0.5),
    connection: { application_name: opts.applicationName ?? 'dsr-connector' },
  });
  const db = drizzle(prepare ? preparedByDefault(sql) : sql, { schema });
  return { db, sql, close: () => sql.end({ timeout: 5 }) };
}

/** The same server URL pointing at another database. */
export function withDatabase(url: string, database: string): string {
  const u = new URL(url);
  u.pathname = `/${database}`;
  return u.toString();
}

/**
 * drizzle's postgres-js driver asks for every query unprepared unless it is given a name. postgres.js then sends
 * Parse/Describe and waits for the answer before Bind/Execute: two round trips for every query with parameters, every
 * time. Prepared (postgres.js keeps each connection's statements by text), a query is one round trip from its second
 * use on. drizzle only reaches the driver through `unsafe` (and `begin`/`savepoint`, whose handles get the same
 * treatment), so that is all this wrapper changes. Statement texts are bounded by the code's query shapes, and
 * postgres.js retires connections (with their statements) after max_lifetime.
 */
function preparedByDefault<T extends postgres.Sql | postgres.TransactionSql>(sql: T): T {
  return new Proxy(sql, {
    get(target, prop, receiver) {
      if (prop === 'unsafe') {
        return (query: string, params?: postgres.ParameterOrJSON<never>[], options?: postgres.UnsafeQueryOptions) =>
          target.unsafe(query, params, { ...options, prepare: true });
      }
      if (prop === 'begin' || prop === 'savepoint') {
        const open = Reflect.get(target, prop, receiver) as (...args: unknown[]) => unknown;
        return (...args: unknown[]) => {
          const body = args.pop() as (tx: postgres.TransactionSql) => unknown;
          return open(...args, (tx: postgres.TransactionSql) => body(preparedByDefault(tx)));
        };
      }
      return Reflect.get(target, prop, receiver) as unknown;
    },
  });
}
