// Exit 0 when a PostgreSQL server answers at the given URL within a few seconds, 1 otherwise.
import postgres from 'postgres';

const sql = postgres(process.argv[2], { max: 1, connect_timeout: 3, onnotice: () => {} });
try {
  const [row] = await sql`select current_setting('server_version') as v`;
  console.log(`PostgreSQL ${row.v} answers`);
  await sql.end({ timeout: 2 });
  process.exit(0);
} catch {
  await sql.end({ timeout: 1 }).catch(() => {});
  process.exit(1);
}
