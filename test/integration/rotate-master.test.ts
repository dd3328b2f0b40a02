import { randomBytes, randomUUID } from 'node:crypto';
import type postgres from 'postgres';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { datagrailBody, datagrailWebhook } from '../../connectors/datagrail/fake.ts';
import { startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { newApp } from '../../src/app.ts';
import { keyIdOf, SealError, Sealer } from '../../src/lib/sealing.ts';
import { newId } from '../../src/lib/ids.ts';
import { subjectSealContext } from '../../src/privacy/execute.ts';
import { retryRequest } from '../../src/privacy/retry.ts';
import { resealAll, resealComplete } from '../../src/upstream/rotate.ts';
import { previousSecretsContext, secretsContext, WebhookConnectors } from '../../src/upstream/store.ts';
import { ticketSecretContext } from '../../src/upstream/tickets.ts';
import { breakErasures, call, createConnectorVia, createTestEnv, type TestEnv } from '../helpers/db.ts';
import { requestRow, seedUser, uniq } from '../helpers/factories.ts';

let env: TestEnv;
let transcend: FakeTranscend;
let ws: CreatedWorkspace;
/** The master key the env's service seals with. */
let keyA: Buffer;
const keyB = randomBytes(32);
const keyC = randomBytes(32);

beforeAll(async () => {
  env = await createTestEnv();
  transcend = await startFakeTranscend();
  ws = await env.newWorkspace('Rotation');
  keyA = env.encryptionKey;
});
afterAll(async () => {
  await transcend?.stop();
  await env?.close();
});

interface Sealed {
  table: 'connectors' | 'upstream_tickets' | 'dsr_requests';
  id: string;
  sealed: string;
  context: string;
}

/** Every sealed value in the database, with the context it is bound to. */
async function allSealed(): Promise<Sealed[]> {
  const connectors = await env.sql`select id, secrets_sealed as s from connectors where secrets_sealed is not null order by id`;
  const tickets = await env.sql`select id, secret_sealed as s from upstream_tickets where secret_sealed is not null order by id`;
  const requests = await env.sql`select id, subject_sealed as s from dsr_requests where subject_sealed is not null order by id`;
  return [
    ...connectors.map((r) => ({ table: 'connectors' as const, id: r.id, sealed: r.s, context: secretsContext(r.id) })),
    ...tickets.map((r) => ({ table: 'upstream_tickets' as const, id: r.id, sealed: r.s, context: ticketSecretContext(r.id) })),
    ...requests.map((r) => ({ table: 'dsr_requests' as const, id: r.id, sealed: r.s, context: subjectSealContext(r.id) })),
  ];
}

const createConnector = (body: unknown) => createConnectorVia(env, ws.adminKey, body);

/**
 * Runs resealAll with the connector row locked, and rewrites the row (`rewrite`, in the locking transaction) once the
 * rotation has read the old ciphertext and its guarded UPDATE waits for the lock: a write that lands in between.
 */
async function resealWithRowRewritten(
  rotating: Sealer,
  connectorId: string,
  rewrite: (tx: postgres.TransactionSql) => Promise<unknown>,
): Promise<Awaited<ReturnType<typeof resealAll>>> {
  let report: Awaited<ReturnType<typeof resealAll>> | undefined;
  let running: Promise<unknown> | undefined;
  await env.sql.begin(async (tx) => {
    await tx`select 1 from connectors where id = ${connectorId} for update`;
    running = resealAll(env.database.db, rotating).then((r) => (report = r));
    for (const until = Date.now() + 10_000; ; ) {
      const waiting = await env.sql`
        select pid from pg_stat_activity
        where datname = current_database() and wait_event_type = 'Lock' and query ilike 'update "connectors"%'`;
      if (waiting.length > 0) break;
      if (report) throw new Error('resealAll finished without waiting for the locked row');
      if (Date.now() > until) throw new Error('resealAll never reached the locked row');
      await new Promise((r) => setTimeout(r, 10));
    }
    await rewrite(tx);
    // The transaction commits when this callback returns; only then can the rotation's UPDATE go on.
  });
  await running;
  return report!;
}

const datagrail = (name: string) => ({
  vendor: 'datagrail',
  name,
  config: {},
  secrets: { webhookSecret: `dg-secret-${uniq('s')}`, apiKey: `dg-key-${uniq('k')}` },
});

describe('master key rotation (resealAll)', () => {
  let failedRequestId: string;
  let failedSubject: string;
  let nonce: string;

  beforeAll(async () => {
    // A failed request keeps its identifier sealed.
    const user = await seedUser(env, ws.ingestKey);
    const restoreErasures = await breakErasures(env, ws.workspaceId);
    try {
      const res = await call(env, 'POST', '/v1/privacy/requests', { key: ws.privacyKey, body: { action: 'erase', email: user.email } });
      failedRequestId = res.json.results[0].requestId;
      failedSubject = (await requestRow(env, failedRequestId)).subject_value;
      await env.runJobs();
    } finally {
      await restoreErasures();
    }
    expect((await requestRow(env, failedRequestId)).status).toBe('failed');

    // Two connectors with secrets, one deleted (its secrets wiped), and a Transcend ticket holding its nonce.
    const transcendId = await createConnector({
      vendor: 'transcend',
      name: 'Transcend',
      config: transcend.config({ identifierTypes: { email: 'email' } }),
      secrets: transcend.secrets,
    });
    await createConnector(datagrail('DataGrail'));
    const gone = await createConnector(datagrail('Deleted'));
    expect((await call(env, 'DELETE', `/v1/admin/connectors/${gone}`, { key: ws.adminKey })).status).toBe(204);
    nonce = `nonce-${uniq('n')}`;
    const w = await transcend.webhook({ profile: { identifier: `${uniq('t')}@example.test`, type: 'email' }, nonce });
    const res = await call(env, 'POST', `/webhooks/transcend/${transcendId}`, { body: w.body, headers: w.headers });
    expect(res.status, res.text).toBe(200);
    // No jobs run from here on: the ticket stays pending with its nonce sealed.
  });

  it('re-seals connector secrets, ticket nonces and failed requests’ identifiers under the new key, once', async () => {
    const kidA = keyIdOf(keyA);
    const kidB = keyIdOf(keyB);
    const before = await allSealed();
    expect(before.map((s) => s.table)).toEqual(['connectors', 'connectors', 'upstream_tickets', 'dsr_requests']);
    for (const s of before) expect(s.sealed.startsWith(`v1.${kidA}.`), s.sealed).toBe(true);
    const plain = new Map(before.map((s) => [`${s.table}:${s.id}`, env.deps.sealer.open(s.sealed, s.context)]));
    expect(plain.get(`upstream_tickets:${before[2]!.id}`)).toBe(nonce);
    expect(plain.get(`dsr_requests:${failedRequestId}`)).toBe(failedSubject);
    expect(JSON.parse(plain.get(`connectors:${before[0]!.id}`)!)).toBeTypeOf('object');

    const rotating = new Sealer(keyB, [keyA]);
    const report = await resealAll(env.database.db, rotating);
    expect(report).toEqual({
      keyId: kidB,
      connectorSecrets: { resealed: 2, current: 0, remaining: 0, unreadable: [] },
      previousInboundSecrets: { resealed: 0, current: 0, remaining: 0, unreadable: [] },
      ticketSecrets: { resealed: 1, current: 0, remaining: 0, unreadable: [] },
      failedRequestSubjects: { resealed: 1, current: 0, remaining: 0, unreadable: [] },
    });

    const after = await allSealed();
    expect(after.map((s) => `${s.table}:${s.id}`)).toEqual(before.map((s) => `${s.table}:${s.id}`));
    for (const s of after) {
      expect(s.sealed.startsWith(`v1.${kidB}.`), s.sealed).toBe(true);
      const expected = plain.get(`${s.table}:${s.id}`);
      // Every process configuration of the rotation opens it: new key with the old as previous, the reverse, and
      // the new key alone once the rotation is done. The old key alone no longer does.
      expect(rotating.open(s.sealed, s.context)).toBe(expected);
      expect(new Sealer(keyA, [keyB]).open(s.sealed, s.context)).toBe(expected);
      expect(new Sealer(keyB).open(s.sealed, s.context)).toBe(expected);
      expect(() => new Sealer(keyA).open(s.sealed, s.context)).toThrow(SealError);
    }
    // Still bound to its row.
    expect(() => rotating.open(after[0]!.sealed, after[1]!.context)).toThrow(SealError);
    // The deleted connector's secrets stay wiped.
    expect(await env.sql`select id from connectors where deleted_at is not null and secrets_sealed is not null`).toHaveLength(0);

    const again = await resealAll(env.database.db, rotating);
    expect(again).toEqual({
      keyId: kidB,
      connectorSecrets: { resealed: 0, current: 2, remaining: 0, unreadable: [] },
      previousInboundSecrets: { resealed: 0, current: 0, remaining: 0, unreadable: [] },
      ticketSecrets: { resealed: 0, current: 1, remaining: 0, unreadable: [] },
      failedRequestSubjects: { resealed: 0, current: 1, remaining: 0, unreadable: [] },
    });
    expect((await allSealed()).map((s) => s.sealed)).toEqual(after.map((s) => s.sealed));

    // A service on the new key retries the failed request with its identifier intact.
    const queued = await retryRequest({ ...env.deps, sealer: new Sealer(keyB) }, ws.workspaceId, failedRequestId);
    expect(queued.request.status).toBe('queued');
    expect((await requestRow(env, failedRequestId)).subject_value).toBe(failedSubject);
  });

  it('never overwrites secrets replaced while the rotation was between its read and its write', async () => {
    const kidC = keyIdOf(keyC);
    const target = await createConnector(datagrail('Replaced during rotation'));
    const stale = await allSealed();
    const staleConnectors = stale.filter((s) => s.table === 'connectors');
    expect(staleConnectors.map((s) => s.id)).toContain(target);
    const original = stale.find((s) => s.id === target)!.sealed;
    const replacement = { webhookSecret: 'replaced-webhook-secret', apiKey: 'replaced-api-key' };
    const rotating = new Sealer(keyC, [keyB, keyA]);
    // An admin's replaceSecrets on a server already sealing with the new key (step 2 of the documented rotation).
    const replacedSealed = rotating.seal(JSON.stringify(replacement), secretsContext(target));
    const report = await resealWithRowRewritten(rotating, target, (tx) =>
      tx`update connectors set secrets_sealed = ${replacedSealed}, secrets_rotated_at = now(), updated_at = now()
         where id = ${target}`,
    );

    const [row] = await env.sql`select secrets_sealed from connectors where id = ${target}`;
    expect(row!.secrets_sealed).toBe(replacedSealed);
    expect(row!.secrets_sealed).not.toBe(original);
    expect(JSON.parse(rotating.open(row!.secrets_sealed, secretsContext(target)))).toEqual(replacement);
    expect(report).toMatchObject({
      keyId: kidC,
      connectorSecrets: { resealed: staleConnectors.length - 1, current: 0, remaining: 0, unreadable: [] },
      ticketSecrets: { resealed: stale.filter((s) => s.table === 'upstream_tickets').length, current: 0, remaining: 0, unreadable: [] },
    });

    // Everything is under the new key after the one run, and a second run finds nothing to do.
    for (const s of await allSealed()) expect(s.sealed.startsWith(`v1.${kidC}.`), `${s.table}:${s.id}`).toBe(true);
    const again = await resealAll(env.database.db, rotating);
    expect(again.connectorSecrets).toEqual({ resealed: 0, current: staleConnectors.length, remaining: 0, unreadable: [] });
    const [finalRow] = await env.sql`select secrets_sealed from connectors where id = ${target}`;
    expect(JSON.parse(new Sealer(keyC).open(finalRow!.secrets_sealed, secretsContext(target)))).toEqual(replacement);
  });
  it('re-seals a value rewritten under the old key during the run; a value no key opens is reported, not a stop', async () => {
    const keyD = randomBytes(32);
    const rotating = new Sealer(keyD, [keyC, keyB, keyA]);
    const stepOne = new Sealer(keyC, [keyD]); // a process not yet sealing with the new key
    const before = await allSealed();
    const connectorIds = before.filter((s) => s.table === 'connectors').map((s) => s.id);
    const [target] = connectorIds;
    const [ticket] = before.filter((s) => s.table === 'upstream_tickets');
    // A nonce sealed for another row: well formed, under the old key, but no key opens it here.
    await env.sql`update upstream_tickets set secret_sealed = ${stepOne.seal('n', ticketSecretContext('tkt_elsewhere'))}
                  where id = ${ticket!.id}`;
    const replacement = { webhookSecret: 'rewritten-on-step-one', apiKey: 'rewritten-api-key' };

    // Rewritten meanwhile under the OLD key: the guarded update misses it; the next pass must re-seal it.
    const report = await resealWithRowRewritten(rotating, target!, (tx) =>
      tx`update connectors set secrets_sealed = ${stepOne.seal(JSON.stringify(replacement), secretsContext(target!))}
         where id = ${target!}`,
    );

    expect(report.connectorSecrets).toEqual({ resealed: connectorIds.length, current: 0, remaining: 0, unreadable: [] });
    expect(report.ticketSecrets).toMatchObject({ remaining: 1, unreadable: [ticket!.id] });
    // Every other value went on to the new key: one bad row does not hold back the rest.
    expect(report.failedRequestSubjects).toMatchObject({ remaining: 0, unreadable: [] });
    expect(resealComplete(report)).toBe(false);
    const [row] = await env.sql`select secrets_sealed from connectors where id = ${target!}`;
    expect(JSON.parse(new Sealer(keyD).open(row!.secrets_sealed, secretsContext(target!)))).toEqual(replacement);

    // The operator clears the bad value: the next run completes.
    await env.sql`update upstream_tickets set secret_sealed = null where id = ${ticket!.id}`;
    const again = await resealAll(env.database.db, rotating);
    expect(resealComplete(again)).toBe(true);
    for (const s of await allSealed()) expect(s.sealed.startsWith(`v1.${keyIdOf(keyD)}.`), `${s.table}:${s.id}`).toBe(true);
  });
});

describe('many sealed values', () => {
  it('re-seals every value of a column holding more than one batch in a single run', async () => {
    // Its own database: the counts above stay those of the flow they describe.
    const own = await createTestEnv();
    try {
      const w = await own.newWorkspace('Many failed requests');
      const N = 450;
      const rows = Array.from({ length: N }, (_, i) => {
        const id = newId('req');
        return {
          id,
          workspace_id: w.workspaceId,
          source: 'api',
          actor_type: 'system',
          action: 'erase',
          scope: 'user',
          subject_kind: 'user_id',
          subject_digest: `digest-${i}`,
          dedupe_key: `many-${i}`,
          status: 'failed',
          subject_sealed: own.deps.sealer.seal(`many-user-${i}`, subjectSealContext(id)),
        };
      });
      await own.sql`insert into dsr_requests ${own.sql(rows)}`;
      const rotating = new Sealer(keyB, [own.encryptionKey]);
      const report = await resealAll(own.database.db, rotating);
      expect(report.failedRequestSubjects).toEqual({ resealed: N, current: 0, remaining: 0, unreadable: [] });
      expect(resealComplete(report)).toBe(true);
      const left = await own.sql`select id, subject_sealed from dsr_requests where workspace_id = ${w.workspaceId} order by id`;
      expect(left).toHaveLength(N);
      const byId = new Map(rows.map((r, i) => [r.id, `many-user-${i}`]));
      for (const r of left) expect(new Sealer(keyB).open(r.subject_sealed as string, subjectSealContext(r.id as string))).toBe(byId.get(r.id as string));
    } finally {
      await own.close();
    }
  });
});

describe('previous inbound secrets', () => {
  it('are re-sealed with the rest; a server on the new key alone still accepts the old secret in its window', async () => {
    // Its own database: the counts above stay those of the flow they describe.
    const own = await createTestEnv();
    try {
      const w = await own.newWorkspace('Previous inbound secrets');
      const secrets = (webhookSecret: string) => ({ webhookSecret, apiKey: 'dg-rotation-api-key' });
      const id = await createConnectorVia(own, w.adminKey, {
        vendor: 'datagrail',
        name: 'DataGrail',
        config: { callbackHosts: ['127.0.0.1'] },
        secrets: secrets('dg-previous-inbound'),
      });
      const put = await call(own, 'PUT', `/v1/admin/connectors/${id}/secrets`, {
        key: w.adminKey,
        body: { secrets: secrets('dg-current-inbound'), keepPreviousForSeconds: 3600 },
      });
      expect(put.status, put.text).toBe(200);
      const previous = async () =>
        (await own.sql`select previous_secrets_sealed as s from connectors where id = ${id}`)[0]!.s as string | null;
      expect(await previous()).toMatch(new RegExp(`^v1\\.${keyIdOf(own.encryptionKey)}\\.`));

      const rotating = new Sealer(keyB, [own.encryptionKey]);
      const report = await resealAll(own.database.db, rotating);
      expect(report.connectorSecrets).toEqual({ resealed: 1, current: 0, remaining: 0, unreadable: [] });
      expect(report.previousInboundSecrets).toEqual({ resealed: 1, current: 0, remaining: 0, unreadable: [] });
      expect(resealComplete(report)).toBe(true);
      const resealed = (await previous())!;
      expect(resealed).toMatch(new RegExp(`^v1\\.${keyIdOf(keyB)}\\.`));
      expect(JSON.parse(new Sealer(keyB).open(resealed, previousSecretsContext(id)))).toEqual({ webhookSecret: 'dg-previous-inbound' });
      expect(() => new Sealer(own.encryptionKey).open(resealed, previousSecretsContext(id))).toThrow(SealError);
      // Bound to its row and to its column: it does not open as the connector's current secrets.
      expect(() => new Sealer(keyB).open(resealed, secretsContext(id))).toThrow(SealError);
      expect((await resealAll(own.database.db, rotating)).previousInboundSecrets).toEqual({
        resealed: 0,
        current: 1,
        remaining: 0,
        unreadable: [],
      });

      // A web process with the new key alone: the old secret still verifies within its window, the new one too.
      const onB = new Sealer(keyB);
      const app = newApp({ ...own.deps, sealer: onB, webhookConnectors: new WebhookConnectors({ db: own.database.db, sealer: onB }) });
      for (const secret of ['dg-previous-inbound', 'dg-current-inbound']) {
        const hook = datagrailWebhook({
          secret,
          body: datagrailBody({
            webhook_request_id: randomUUID(),
            identifiers: { email: `${uniq('prev')}@example.test` },
            callback_url: 'http://127.0.0.1:9/cb',
          }),
        });
        const res = await app.request(`/webhooks/datagrail/${id}`, { method: 'POST', headers: hook.headers, body: hook.rawBody });
        expect(res.status, `${secret}: ${await res.clone().text()}`).toBe(200);
      }

      // A previous set no configured key opens is reported by its row, not a stop.
      await own.sql`update connectors set previous_secrets_sealed = ${onB.seal('{}', previousSecretsContext('con_elsewhere'))}
                    where id = ${id}`;
      const toC = await resealAll(own.database.db, new Sealer(keyC, [keyB]));
      expect(toC.previousInboundSecrets).toEqual({ resealed: 0, current: 0, remaining: 1, unreadable: [id] });
      expect(toC.connectorSecrets).toMatchObject({ resealed: 1, remaining: 0 });
      expect(resealComplete(toC)).toBe(false);
    } finally {
      await own.close();
    }
  });
});
