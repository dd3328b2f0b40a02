/**
 * Prebuilt statements (src/db/prebuilt.ts): built once with placeholders, run on the pool or on a transaction's own
 * connection, returning exactly what drizzle's builder returns for the same chain.
 */
import { and, eq, sql } from 'drizzle-orm';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { endUsers, workspaces } from '../../src/db/schema/index.ts';
import { commitWithoutFlush, p, prebuilt, prebuiltSql } from '../../src/db/prebuilt.ts';
import { createDatabase } from '../../src/db/client.ts';
import { dispatchOutbox } from '../../src/jobs/outbox.ts';
import { createTestEnv, type TestEnv } from '../helpers/db.ts';

let env: TestEnv;

beforeAll(async () => {
  env = await createTestEnv();
});

afterAll(async () => {
  await env?.close();
});

const selection = {
  workspace: { id: workspaces.id, name: workspaces.name, createdAt: workspaces.createdAt },
  user: { id: endUsers.id, traits: endUsers.traits, lastSeenAt: endUsers.lastSeenAt },
};
const workspaceWithUsers = prebuilt((b) =>
  b
    .select(selection)
    .from(workspaces)
    .leftJoin(endUsers, eq(endUsers.workspaceId, workspaces.id))
    .where(eq(workspaces.id, p('workspaceId')))
    .orderBy(endUsers.id),
);

it('maps rows as drizzle does: nested groups, a left join with no match (null group), timestamps, jsonb', async () => {
  const { db } = env.database;
  const lonely = await env.newWorkspace('Prebuilt: no users');
  const busy = await env.newWorkspace('Prebuilt: users');
  const seen = new Date('2026-03-04T05:06:07.089Z');
  await db.insert(endUsers).values([
    { workspaceId: busy.workspaceId, externalId: 'u-1', traits: { plan: 'pro', seats: 3 }, lastSeenAt: seen },
    { workspaceId: busy.workspaceId, externalId: 'u-2' },
  ]);
  const direct = (workspaceId: string) =>
    db
      .select(selection)
      .from(workspaces)
      .leftJoin(endUsers, eq(endUsers.workspaceId, workspaces.id))
      .where(eq(workspaces.id, workspaceId))
      .orderBy(endUsers.id);

  for (const ws of [lonely, busy]) {
    const rows = await workspaceWithUsers.run(db, { workspaceId: ws.workspaceId });
    expect(rows).toEqual(await direct(ws.workspaceId));
  }
  const [none] = await workspaceWithUsers.run(db, { workspaceId: lonely.workspaceId });
  expect(none!.user).toBeNull();
  const [first, second] = await workspaceWithUsers.run(db, { workspaceId: busy.workspaceId });
  expect(first!.workspace.createdAt).toBeInstanceOf(Date);
  expect(first!.user).toMatchObject({ traits: { plan: 'pro', seats: 3 }, lastSeenAt: seen });
  expect(second!.user).toMatchObject({ traits: {}, lastSeenAt: null });
});

it('encodes values through their columns, returns what a returning clause names, and counts what it changed', async () => {
  const { db } = env.database;
  const ws = await env.newWorkspace('Prebuilt: writes');
  await db.insert(endUsers).values([1, 2, 3].map((i) => ({ workspaceId: ws.workspaceId, externalId: `w-${i}` })));
  const touch = prebuilt((b) =>
    b
      .update(endUsers)
      .set({ lastSeenAt: p('at') as never, traits: p('traits') as never })
      .where(and(eq(endUsers.workspaceId, p('workspaceId')), eq(endUsers.externalId, p('externalId'))))
      .returning({ externalId: endUsers.externalId, lastSeenAt: endUsers.lastSeenAt, traits: endUsers.traits }),
  );
  const at = new Date('2026-01-02T03:04:05.678Z');
  const updated = await touch.run(db, { workspaceId: ws.workspaceId, externalId: 'w-2', at, traits: { a: [1, 'b'] } });
  expect(updated).toEqual([{ externalId: 'w-2', lastSeenAt: at, traits: { a: [1, 'b'] } }]);
  // A null goes through as null, as with the builder, even for a column whose encoder could not take it.
  const cleared = await touch.run(db, { workspaceId: ws.workspaceId, externalId: 'w-2', at: null, traits: { a: [1, 'b'] } });
  expect(cleared).toEqual([{ externalId: 'w-2', lastSeenAt: null, traits: { a: [1, 'b'] } }]);

  const removeSome = prebuilt((b) =>
    b.delete(endUsers).where(sql`${endUsers.workspaceId} = ${p('workspaceId')} and ${endUsers.externalId} = any(${p('ids')}::text[])`),
  );
  const result = await removeSome.run(db, { workspaceId: ws.workspaceId, ids: env.database.sql.array(['w-1', 'w-3', 'nobody']) });
  expect(result.count).toBe(2);
  const left = await db.select({ externalId: endUsers.externalId }).from(endUsers).where(eq(endUsers.workspaceId, ws.workspaceId));
  expect(left).toEqual([{ externalId: 'w-2' }]);
});

it("runs on a transaction's own connection, and statements started in a row run in that order", async () => {
  const { db } = env.database;
  const ws = await env.newWorkspace('Prebuilt: transactions');
  const setting = prebuiltSql(() => sql`select set_config('dsr.prebuilt_test', ${p('value')}, true)`);
  const reading = prebuiltSql<{ value: string | null }>(() => sql`select current_setting('dsr.prebuilt_test', true) as value`);
  const insertUser = prebuilt((b) => b.insert(endUsers).values({ workspaceId: p('workspaceId') as never, externalId: 'tx-user' }));

  await expect(
    db.transaction(async (tx) => {
      // The set is sent when run is called, before anything awaits it: a read sent next on the same connection
      // (here through drizzle, which sends on its own schedule) sees its value.
      const set = setting.run(tx, { value: 'set-first' });
      const inserted = insertUser.run(tx, { workspaceId: ws.workspaceId });
      const [read] = await tx.execute<{ value: string | null }>(sql`select current_setting('dsr.prebuilt_test', true) as value`);
      expect(read!.value).toBe('set-first');
      await Promise.all([set, inserted]);
      throw new Error('roll back');
    }),
  ).rejects.toThrow('roll back');
  // The insert was part of the rolled-back transaction; the setting was local to it.
  expect(await db.select().from(endUsers).where(eq(endUsers.workspaceId, ws.workspaceId))).toEqual([]);
  const [outside] = await reading.run(db);
  expect(outside!.value ?? '').toBe('');
});

it('says which value is missing instead of sending the statement', async () => {
  await expect(workspaceWithUsers.run(env.database.db, {})).rejects.toThrow(/workspaceId/);
});

it('commitWithoutFlush holds for its own transaction only: the connection commits durably again afterwards', async () => {
  // One connection, so every statement below runs on the connection the flagged ones ran on.
  const single = createDatabase(env.url, { max: 1 });
  try {
    const ws = await env.newWorkspace('Prebuilt: commit without flush');
    const setting = prebuiltSql<{ value: string }>(() => sql`select current_setting('synchronous_commit') as value`);
    const rename = prebuilt((b) =>
      b.update(workspaces).set({ name: p('name') as never }).where(and(eq(workspaces.id, p('id')), commitWithoutFlush)),
    );
    // The test server runs with synchronous_commit off (throwaway data): the session asks for durable commits.
    await single.sql`set synchronous_commit = on`;
    expect((await setting.run(single.db))[0]!.value).toBe('on');
    await single.db.transaction(async (tx) => {
      expect((await rename.run(tx, { id: ws.workspaceId, name: 'renamed' })).count).toBe(1); // the condition is true
      expect((await setting.run(tx))[0]!.value).toBe('off');
    });
    // Run on its own (an implicit transaction), and after the dispatcher's statement, which sets it too.
    await rename.run(single.db, { id: ws.workspaceId, name: 'renamed again' });
    await dispatchOutbox(single.db);
    expect((await setting.run(single.db))[0]!.value).toBe('on');
    const [row] = await single.db.select({ name: workspaces.name }).from(workspaces).where(eq(workspaces.id, ws.workspaceId));
    expect(row!.name).toBe('renamed again');
  } finally {
    await single.close();
  }
});

it('prepares statements on the connection, and never when the handle was made with prepare off (DB_PREPARE=false)', async () => {
  const countPrepared = prebuiltSql<{ n: number }>(
    () => sql`select count(*)::int as n from pg_prepared_statements where statement like ${p('pattern')}`,
  );
  const probe = prebuiltSql<{ one: number }>(() => sql`select 1 as one /* prebuilt prepare probe */ where ${p('x')}::int = 1`);
  for (const prepare of [true, false]) {
    const single = createDatabase(env.url, { max: 1, prepare });
    try {
      await probe.run(single.db, { x: 1 });
      await probe.run(single.db, { x: 1 });
      const [row] = await countPrepared.run(single.db, { pattern: '%prebuilt prepare probe%' });
      expect(row!.n, `prepare ${prepare}`).toBe(prepare ? 1 : 0);
    } finally {
      await single.close();
    }
  }
});
