/**
 * The admin CLI end to end: the real `dsr-connector` process (bin → tsx → src/cli.ts) against the test database,
 * with the test's digest and master keys, judged by its exit status, its one JSON document on stdout, the database,
 * and the HTTP API of an in-process app sharing the same keys.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { eq } from 'drizzle-orm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DATAGRAIL_CALLBACK_ROUTE,
  datagrailBody,
  datagrailWebhook,
  FAKE_DATAGRAIL_API_KEY,
  startFakeDataGrail,
} from '../../connectors/datagrail/fake.ts';
import { startFakeOneTrust, type FakeOneTrust } from '../../connectors/onetrust/fake.ts';
import { startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { newApp } from '../../src/app.ts';
import { parseEnv } from '../../src/config.ts';
import { connectors } from '../../src/db/schema/index.ts';
import { createNodeDeps } from '../../src/deps-node.ts';
import { runDueJobs } from '../../src/jobs/run-once.ts';
import { taskList } from '../../src/jobs/tasks.ts';
import { createLogger } from '../../src/lib/logger.ts';
import { keyIdOf, Sealer, secretFingerprint } from '../../src/lib/sealing.ts';
import { subjectSealContext } from '../../src/privacy/execute.ts';
import { connectorsTick } from '../../src/upstream/poll.ts';
import { openConnector, secretsContext, type ConnectorRow } from '../../src/upstream/store.ts';
import { ticketSecretContext } from '../../src/upstream/tickets.ts';
import { breakErasures, call, createTestEnv, type TestEnv } from '../helpers/db.ts';
import { seedUser, userFootprint } from '../helpers/factories.ts';
import { login } from '../helpers/sessions.ts';
import { childEnv, poll, runCli, startService } from '../helpers/process.ts';

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Json = any;

const OT = { clientId: 'ot-cli-client', clientSecret: 'ot-cli-client-secret', inboundSecret: 'ot-cli-inbound-secret' };
const DG_SECRET = 'dg-cli-webhook-secret';

let env: TestEnv;
let ws: CreatedWorkspace;
let onetrust: FakeOneTrust;
let tmp: string;

/** The CLI's environment: the test database and the test app's keys, so both sides read each other's data. */
const cliEnv = (t: TestEnv, extra: NodeJS.ProcessEnv = {}) =>
  childEnv({
    DATABASE_URL: t.url,
    DATA_DIR: tmp,
    DSR_DIGEST_KEY: t.deps.digestKey.toString('base64'),
    DSR_ENCRYPTION_KEY: t.encryptionKey.toString('base64'),
    OUTBOUND_ALLOW_PRIVATE_NETWORKS: 'true',
    LOG_LEVEL: 'warn',
    ...extra,
  });

interface RunOpts {
  input?: string;
  env?: NodeJS.ProcessEnv;
  on?: TestEnv;
}

const run = (args: string[], opts: RunOpts = {}) => runCli(args, cliEnv(opts.on ?? env, opts.env), { input: opts.input });

/** Stdout must be exactly one JSON document (one line). */
function onlyDocument(stdout: string): Json {
  const lines = stdout.split('\n').filter(Boolean);
  expect(lines, stdout).toHaveLength(1);
  return JSON.parse(lines[0]!);
}

/** A --json command that must succeed: exit 0, nothing on stderr, one document. */
async function ok(args: string[], opts: RunOpts = {}): Promise<Json> {
  const r = await run([...args, '--json'], opts);
  expect(r.code, `${args.join(' ')}\n${r.stderr}\n${r.stdout}`).toBe(0);
  expect(r.stderr).toBe('');
  return onlyDocument(r.stdout);
}

/** A --json command that must fail: the exit status, `{"error":{code,message}}` on stdout, the message on stderr. */
async function fails(args: string[], exitCode: 1 | 2, code: string, opts: RunOpts = {}) {
  const r = await run([...args, '--json'], opts);
  expect(r.code, `${args.join(' ')}\n${r.stderr}\n${r.stdout}`).toBe(exitCode);
  const doc = onlyDocument(r.stdout);
  expect(Object.keys(doc)).toEqual(['error']);
  expect(doc.error.code).toBe(code);
  expect(r.stderr).toContain(`error: ${doc.error.message}`);
  return { message: doc.error.message as string, details: doc.error.details as { path: string; message: string }[] | undefined, ...r };
}

async function connectorRow(t: TestEnv, id: string): Promise<ConnectorRow> {
  const [row] = await t.deps.db.select().from(connectors).where(eq(connectors.id, id));
  return row!;
}

const api = (method: string, p: string, key: string, body?: unknown) => call(env, method, p, { key, body });

beforeAll(async () => {
  env = await createTestEnv();
  ws = await env.newWorkspace('CLI');
  onetrust = await startFakeOneTrust(OT);
  tmp = await mkdtemp(path.join(os.tmpdir(), 'dsr-cli-'));
});

afterAll(async () => {
  await onetrust?.fake.stop();
  await env?.close();
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

describe('usage', () => {
  it('help prints the usage; bad commands and flags exit 2 naming the problem, before touching the database', async () => {
    // Nothing listens there: a command that reached for the database would fail with 1, not 2.
    const nowhere = { env: { DATABASE_URL: 'postgres://127.0.0.1:1/nowhere' } };
    const [help, unknown, noVerb, badScope, missing, extra, unknownFlag] = await Promise.all([
      run(['help']),
      run(['frobnicate', '--json'], nowhere),
      run(['keys'], nowhere),
      run(['keys', 'create', '--workspace', ws.workspaceId, '--scope', 'root', '--json'], nowhere),
      run(['keys', 'list', '--json'], nowhere),
      run(['keys', 'revoke', 'key_a', 'key_b'], nowhere),
      run(['connectors', 'list', '--workspace', ws.workspaceId, '--verbose'], nowhere),
    ]);
    expect(help.code).toBe(0);
    for (const cmd of ['admins create', 'keys rotate-master', 'connectors rotate-secret', 'requests retry', 'holds list', 'audit verify', 'serve [--role web|all]']) {
      expect(help.stdout).toContain(cmd);
    }
    expect(help.stdout).toContain('DSR_ENCRYPTION_KEYS_PREVIOUS');

    expect(unknown.code).toBe(2);
    expect(onlyDocument(unknown.stdout)).toEqual({ error: { code: 'usage_error', message: 'unknown command: frobnicate' } });
    expect(unknown.stderr).toContain('Usage: dsr-connector');
    expect(noVerb.code).toBe(2);
    expect(noVerb.stderr).toContain('keys needs a verb: list, create, revoke, rotate, rotate-master');
    expect(badScope.code).toBe(2);
    expect(onlyDocument(badScope.stdout).error.message).toBe('--scope must be one of ingest, privacy, admin');
    expect(missing.code).toBe(2);
    expect(onlyDocument(missing.stdout).error.message).toBe('keys list needs --workspace <id>');
    expect(extra.code).toBe(2);
    expect(extra.stderr).toContain('keys revoke needs <keyId>');
    expect(unknownFlag.code).toBe(2);
    expect(unknownFlag.stderr).toContain("Unknown option '--verbose'");
  });
});

describe('workspaces and admins', () => {
  it('workspaces create prints the three keys once, and they work', async () => {
    const created = await ok(['workspaces', 'create', '--name', 'From the CLI']);
    expect(Object.keys(created)).toEqual(['workspaceId', 'ingestKey', 'privacyKey', 'adminKey']);
    expect(created.adminKey).toMatch(/^dsr_admin_[A-Za-z0-9_-]{43}$/);
    const [row] = await env.sql`select name from workspaces where id = ${created.workspaceId}`;
    expect(row!.name).toBe('From the CLI');
    expect((await api('GET', '/v1/admin/keys', created.adminKey)).json.data.map((k: Json) => k.scope).sort()).toEqual([
      'admin',
      'ingest',
      'privacy',
    ]);
  });

  it("a verb's validation error (zod) exits 1 listing path and message, never the value", async () => {
    const name = `too-long-${'x'.repeat(200)}`;
    const r = await fails(['workspaces', 'create', '--name', name], 1, 'validation_failed');
    expect(r.message).toBe('input failed validation');
    expect(r.details).toEqual([{ path: '(input)', message: expect.stringMatching(/200/) }]);
    expect(r.stdout + r.stderr).not.toContain('too-long-');
  });

  it('admins create takes the password from stdin, never echoes it, and the admin can log in', async () => {
    const password = `cli-${randomBytes(12).toString('base64url')}`;
    const r = await run(['admins', 'create', '--workspace', ws.workspaceId, '--email', ' Ops.Lead@Example.TEST ', '--password-stdin', '--json'], {
      input: `${password}\n`,
    });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout + r.stderr).not.toContain(password);
    const admin = onlyDocument(r.stdout);
    expect(admin).toEqual({
      id: expect.stringMatching(/^adm_/),
      workspaceId: ws.workspaceId,
      email: 'ops.lead@example.test',
      createdAt: expect.any(String),
      passwordChangedAt: expect.any(String),
      disabledAt: null,
    });
    const [row] = await env.sql`select password_hash from admin_users where id = ${admin.id}`;
    expect(row!.password_hash).toMatch(/^scrypt\$/);
    // The trailing newline was the shell's, not part of the password.
    const { res } = await login(env, { workspaceId: ws.workspaceId, email: 'ops.lead@example.test', password });
    expect(res.status, res.text).toBe(200);
    expect(res.json.admin).toEqual({ id: admin.id, email: 'ops.lead@example.test', workspaceId: ws.workspaceId });
  });

  it('admins create falls back to DSR_ADMIN_PASSWORD, then to a generated password printed once', async () => {
    const password = `env-${randomBytes(12).toString('base64url')}`;
    const fromEnv = await run(['admins', 'create', '--workspace', ws.workspaceId, '--email', 'env@example.test', '--json'], {
      env: { DSR_ADMIN_PASSWORD: password },
    });
    expect(fromEnv.code, fromEnv.stderr).toBe(0);
    expect(fromEnv.stdout + fromEnv.stderr).not.toContain(password);
    expect(onlyDocument(fromEnv.stdout)).not.toHaveProperty('generatedPassword');
    expect((await login(env, { workspaceId: ws.workspaceId, email: 'env@example.test', password })).res.status).toBe(200);

    const generated = await ok(['admins', 'create', '--workspace', ws.workspaceId, '--email', 'gen@example.test']);
    expect(generated.generatedPassword).toMatch(/^[A-Za-z0-9_-]{24}$/);
    const { res } = await login(env, { workspaceId: ws.workspaceId, email: 'gen@example.test', password: generated.generatedPassword });
    expect(res.status, res.text).toBe(200);
  });

  it('admins create refuses a password on the command line, a short one, a bad email, a duplicate, an unknown workspace', async () => {
    const before = (await env.sql`select count(*)::int as n from admin_users`)[0]!.n;
    const create = (email: string, workspace = ws.workspaceId) => ['admins', 'create', '--workspace', workspace, '--email', email];
    const [onLine, short, email, dup, unknown] = await Promise.all([
      fails([...create('x@example.test'), '--password=hunter2hunter2'], 2, 'usage_error'),
      fails([...create('x@example.test'), '--password-stdin'], 2, 'usage_error', { input: 'short\n' }),
      fails(create('not-an-email'), 2, 'usage_error'),
      fails(create('OPS.LEAD@example.test'), 1, 'conflict'),
      fails(create('y@example.test', 'ws_nope'), 1, 'not_found'),
    ]);
    expect(onLine.message).toBe('--password is not accepted: pipe it with --password-stdin, or set DSR_ADMIN_PASSWORD');
    expect(onLine.stdout + onLine.stderr).not.toContain('hunter2');
    expect(short.message).toBe('the password read from stdin must have at least 12 characters');
    expect(email.message).toBe('--email must be a valid email address');
    expect(dup.message).toBe('an admin with this email already exists in the workspace');
    expect(unknown.message).toBe('no such workspace: ws_nope');
    expect((await env.sql`select count(*)::int as n from admin_users`)[0]!.n).toBe(before);
  });

  it('admins list shows the workspace admins, never a hash', async () => {
    const list = await ok(['admins', 'list', '--workspace', ws.workspaceId]);
    expect(list.data.map((a: Json) => a.email)).toEqual(['ops.lead@example.test', 'env@example.test', 'gen@example.test']);
    expect(Object.keys(list.data[0]).sort()).toEqual(['createdAt', 'disabledAt', 'email', 'id', 'passwordChangedAt', 'workspaceId']);
  });

  it('admins disable ends the sessions of an admin and stops their logins; another workspace cannot name them', async () => {
    const password = `dis-${randomBytes(12).toString('base64url')}`;
    const admin = await ok(['admins', 'create', '--workspace', ws.workspaceId, '--email', 'leaver@example.test'], {
      env: { DSR_ADMIN_PASSWORD: password },
    });
    const creds = { workspaceId: ws.workspaceId, email: 'leaver@example.test', password };
    const { res: first, cookie } = await login(env, creds);
    expect(first.status, first.text).toBe(200);
    expect((await call(env, 'GET', '/v1/auth/session', { headers: { cookie: cookie! } })).status).toBe(200);
    const other = await ok(['workspaces', 'create', '--name', 'cli-other']);
    await fails(['admins', 'disable', '--workspace', other.workspaceId, admin.id], 1, 'not_found');
    await fails(['admins', 'disable', admin.id], 2, 'usage_error');
    expect((await env.sql`select disabled_at from admin_users where id = ${admin.id}`)[0]!.disabled_at).toBeNull();

    const disabled = await ok(['admins', 'disable', '--workspace', ws.workspaceId, admin.id]);
    expect(disabled).toMatchObject({ id: admin.id, disabledAt: expect.any(String) });
    expect((await call(env, 'GET', '/v1/auth/session', { headers: { cookie: cookie! } })).status).toBe(401);
    expect((await login(env, creds)).res.status).toBe(401);
  });
});

describe('API keys', () => {
  const keyIdOfScope = async (scope: string) =>
    (await env.sql`select id from api_keys where workspace_id = ${ws.workspaceId} and scope = ${scope} and revoked_at is null`)[0]!
      .id as string;

  it('keys list shows ids, scopes and prefixes, never the keys', async () => {
    const r = await run(['keys', 'list', '--workspace', ws.workspaceId, '--json']);
    expect(r.code).toBe(0);
    const list = onlyDocument(r.stdout);
    expect(list.data.map((k: Json) => k.scope).sort()).toEqual(['admin', 'ingest', 'privacy']);
    for (const k of list.data) {
      expect(Object.keys(k)).toEqual(['id', 'scope', 'prefix', 'createdAt', 'lastUsedAt', 'revokedAt']);
      expect(k.prefix).toBe(`dsr_${k.scope}_` + (ws as Json)[`${k.scope}Key`].slice(`dsr_${k.scope}_`.length, `dsr_${k.scope}_`.length + 6));
    }
    for (const key of [ws.ingestKey, ws.privacyKey, ws.adminKey]) expect(r.stdout).not.toContain(key);
  });

  it('keys create prints a working key once (human output too)', async () => {
    const created = await ok(['keys', 'create', '--workspace', ws.workspaceId, '--scope', 'privacy']);
    expect(created).toMatchObject({ scope: 'privacy', revokedAt: null, key: expect.stringMatching(/^dsr_privacy_/) });
    expect((await api('GET', '/v1/privacy/requests', created.key)).status).toBe(200);
    const [row] = await env.sql`select workspace_id, scope from api_keys where id = ${created.id}`;
    expect(row).toEqual({ workspace_id: ws.workspaceId, scope: 'privacy' });

    const human = await run(['keys', 'create', '--workspace', ws.workspaceId, '--scope', 'ingest']);
    expect(human.code).toBe(0);
    const key = /(dsr_ingest_[A-Za-z0-9_-]{43})/.exec(human.stdout)?.[1];
    expect(human.stdout).toContain('shown once');
    expect((await call(env, 'POST', '/v1/track', { key, body: { userId: 'cli-u', event: 'e' } })).status).toBe(200);
  });

  it('keys rotate revokes the old key (401 at once) and prints a working new one of the same scope', async () => {
    const oldId = await keyIdOfScope('admin');
    expect((await api('GET', '/v1/admin/keys', ws.adminKey)).status).toBe(200);
    const rotated = await ok(['keys', 'rotate', oldId]);
    expect(rotated).toMatchObject({ revokedKeyId: oldId, scope: 'admin', revokedAt: null, key: expect.stringMatching(/^dsr_admin_/) });
    expect(rotated.id).not.toBe(oldId);
    const stale = await api('GET', '/v1/admin/keys', ws.adminKey);
    expect(stale.status).toBe(401);
    expect(stale.json.error.code).toBe('unauthorized');
    const fresh = await api('GET', '/v1/admin/keys', rotated.key);
    expect(fresh.status).toBe(200);
    expect(fresh.json.data.find((k: Json) => k.id === oldId).revokedAt).not.toBeNull();
    ws.adminKey = rotated.key;
  });

  it('keys revoke: the key fails at once; revoking twice or an unknown id fails with exit 1', async () => {
    const created = await ok(['keys', 'create', '--workspace', ws.workspaceId, '--scope', 'ingest']);
    const revoked = await ok(['keys', 'revoke', created.id]);
    expect(revoked).toMatchObject({ id: created.id, scope: 'ingest', revokedAt: expect.any(String) });
    expect(revoked).not.toHaveProperty('key');
    expect((await call(env, 'POST', '/v1/track', { key: created.key, body: { userId: 'u', event: 'e' } })).status).toBe(401);
    const [twice, unknown] = await Promise.all([
      fails(['keys', 'revoke', created.id], 1, 'conflict'),
      fails(['keys', 'rotate', 'key_unknown'], 1, 'not_found'),
    ]);
    expect(twice.message).toBe('the API key is already revoked');
    expect(unknown.message).toBe('no such API key: key_unknown');
  });
});

describe('connectors', () => {
  let otId = '';
  let dgId = '';
  let otView: Json;
  const dbRow = (id: string) => connectorRow(env, id);

  it('connectors add (secrets from a file) mirrors the admin API view; secrets stored sealed, shown as fingerprints only', async () => {
    const secretsFile = path.join(tmp, 'ot-secrets.json');
    await writeFile(secretsFile, JSON.stringify(OT), { mode: 0o600 });
    const r = await run([
      'connectors', 'add', '--workspace', ws.workspaceId, '--vendor', 'onetrust', '--name', 'OneTrust via CLI',
      '--config', JSON.stringify({ baseUrl: onetrust.url }), '--secrets-file', secretsFile, '--json',
    ]);
    expect(r.code, r.stderr).toBe(0);
    for (const v of Object.values(OT)) expect(r.stdout + r.stderr).not.toContain(v);
    otView = onlyDocument(r.stdout);
    otId = otView.id;
    const fp = (v: string) => ({ set: true, fingerprint: secretFingerprint(env.deps.digestKey, v) });
    expect(otView).toMatchObject({
      vendor: 'onetrust',
      name: 'OneTrust via CLI',
      enabled: true,
      secrets: { clientId: fp(OT.clientId), clientSecret: fp(OT.clientSecret), inboundSecret: fp(OT.inboundSecret) },
      webhookPath: `/webhooks/onetrust/${otId}`,
      // The CLI runs without PUBLIC_BASE_URL; the test app has one.
      webhookUrl: null,
    });
    const viaApi = await api('GET', `/v1/admin/connectors/${otId}`, ws.adminKey);
    expect(viaApi.status).toBe(200);
    expect({ ...otView, webhookUrl: viaApi.json.webhookUrl }).toEqual(viaApi.json);

    const row = await dbRow(otId);
    expect(row.workspaceId).toBe(ws.workspaceId);
    expect(row.secretsSealed).toMatch(new RegExp(`^v1\\.${keyIdOf(env.encryptionKey)}\\.`));
    expect(openConnector(env.deps.sealer, row).instance.secrets).toEqual(OT);
  });

  it('connectors add reads secrets from stdin and config from a file', async () => {
    const configFile = path.join(tmp, 'dg-config.json');
    await writeFile(configFile, JSON.stringify({ callbackHosts: ['127.0.0.1'] }));
    const view = await ok(
      ['connectors', 'add', '--workspace', ws.workspaceId, '--vendor', 'datagrail', '--name', 'DataGrail', '--config-file', configFile, '--secrets-stdin'],
      { input: JSON.stringify({ webhookSecret: DG_SECRET, apiKey: FAKE_DATAGRAIL_API_KEY }) },
    );
    dgId = view.id;
    expect(view.config.callbackHosts).toEqual(['127.0.0.1']);
    expect(Object.keys(view.secrets).sort()).toEqual(['apiKey', 'webhookSecret']);
    expect(openConnector(env.deps.sealer, await dbRow(dgId)).instance.secrets).toEqual({
      webhookSecret: DG_SECRET,
      apiKey: FAKE_DATAGRAIL_API_KEY,
    });
  });

  it('connectors add refuses secrets on the command line, bad JSON (without echoing it), a bad vendor, invalid secrets', async () => {
    const before = (await env.sql`select count(*)::int as n from connectors`)[0]!.n;
    const add = ['connectors', 'add', '--workspace', ws.workspaceId, '--vendor', 'onetrust', '--name', 'x', '--config', JSON.stringify({ baseUrl: onetrust.url })];
    const [onLine, none, badJson, vendor, invalid] = await Promise.all([
      fails([...add, '--secrets', '{"clientSecret":"on-the-line"}'], 2, 'usage_error'),
      fails(add, 2, 'usage_error'),
      fails([...add, '--secrets-stdin'], 2, 'usage_error', { input: 'clientSecret=s3cr3t-value' }),
      fails(['connectors', 'add', '--workspace', ws.workspaceId, '--vendor', 'acme', '--name', 'x', '--secrets-stdin'], 2, 'usage_error', {
        input: '{}',
      }),
      fails([...add, '--secrets-stdin'], 1, 'validation_failed', {
        input: JSON.stringify({ clientId: 'cid-value', clientSecret: 'secret-value-xyz' }),
      }),
    ]);
    expect(onLine.message).toBe('--secrets is not accepted: secrets are never taken on the command line; use --secrets-file <file> or --secrets-stdin');
    expect(onLine.stdout + onLine.stderr).not.toContain('on-the-line');
    expect(none.message).toBe('connectors add needs --secrets-file <file> or --secrets-stdin (a JSON object)');
    expect(badJson.message).toBe('--secrets-stdin is not valid JSON');
    expect(badJson.stdout + badJson.stderr).not.toContain('s3cr3t-value');
    expect(vendor.message).toBe('--vendor must be one of transcend, onetrust, datagrail');
    expect(invalid.message).toBe('secrets is not valid for this vendor');
    expect(invalid.details).toEqual([{ path: 'secrets.inboundSecret', message: expect.any(String) }]);
    expect(invalid.stderr).toContain('secrets.inboundSecret:');
    expect(invalid.stdout + invalid.stderr).not.toContain('secret-value-xyz');
    expect((await env.sql`select count(*)::int as n from connectors`)[0]!.n).toBe(before);
  });

  it('connectors add with a value PostgreSQL cannot store (a NUL) is validation_failed as over the API, never the SQL', async () => {
    const before = (await env.sql`select count(*)::int as n from connectors`)[0]!.n;
    const apiKey = `transcend-api-key-${randomBytes(6).toString('hex')}`;
    const secretsFile = path.join(tmp, 'nul-secrets.json');
    await writeFile(secretsFile, JSON.stringify({ apiKey }), { mode: 0o600 });
    const config = { sombraUrl: 'https://multi-tenant.sombra.transcend.io', audience: 'aud\u0000x' };
    const r = await fails(
      ['connectors', 'add', '--workspace', ws.workspaceId, '--vendor', 'transcend', '--name', 'T', '--config', JSON.stringify(config), '--secrets-file', secretsFile],
      1,
      'validation_failed',
    );
    expect(r.message).toBe('a value in the input cannot be stored (for example a NUL character or an out-of-range number)');
    expect(r.stdout + r.stderr).not.toMatch(/Failed query|params:|insert into|secrets_sealed|v1\.k[0-9a-f]{8}\./i);
    expect(r.stdout + r.stderr).not.toContain(apiKey);

    const viaApi = await api('POST', '/v1/admin/connectors', ws.adminKey, { vendor: 'transcend', name: 'T', config, secrets: { apiKey } });
    expect(viaApi.status, viaApi.text).toBe(400);
    expect(viaApi.json.error.code).toBe('validation_failed');
    expect((await env.sql`select count(*)::int as n from connectors`)[0]!.n).toBe(before);
  });

  it('connectors list and show give the same views; an unknown id exits 1', async () => {
    const [list, shown, unknown] = await Promise.all([
      ok(['connectors', 'list', '--workspace', ws.workspaceId]),
      ok(['connectors', 'show', otId]),
      fails(['connectors', 'show', 'con_unknown'], 1, 'not_found'),
    ]);
    expect(list.data.map((c: Json) => c.id)).toEqual([otId, dgId]);
    expect(list.data[0]).toEqual(otView);
    expect(shown).toEqual(otView);
    expect(unknown.message).toBe('no such connector: con_unknown');
  });

  it('connectors test passes against the fake vendor, and fails (exit 1) once the secret is rotated to a wrong one', async () => {
    const tokens = onetrust.tokensIssued();
    const good = await ok(['connectors', 'test', otId]);
    expect(good.ok).toBe(true);
    expect(good.checks.map((c: Json) => [c.name, c.ok])).toEqual([
      ['inbound secret', true],
      ['oauth token', true],
    ]);
    expect(onetrust.tokensIssued()).toBe(tokens + 1);

    const wrong = { ...OT, clientSecret: 'rotated-but-wrong-secret' };
    const rotated = await ok(['connectors', 'rotate-secret', otId, '--secrets-stdin'], { input: JSON.stringify(wrong) });
    expect(rotated.secrets.clientId).toEqual(otView.secrets.clientId);
    expect(rotated.secrets.clientSecret.fingerprint).toBe(secretFingerprint(env.deps.digestKey, wrong.clientSecret));
    expect(rotated.secretsRotatedAt > otView.secretsRotatedAt).toBe(true);
    expect(openConnector(env.deps.sealer, await dbRow(otId)).instance.secrets).toEqual(wrong);

    const r = await run(['connectors', 'test', otId, '--json']);
    expect(r.code).toBe(1);
    const bad = onlyDocument(r.stdout);
    expect(bad.ok).toBe(false);
    expect(bad.checks[1]).toMatchObject({ name: 'oauth token', ok: false, detail: expect.stringContaining('refused the client credentials') });
    expect(r.stdout + r.stderr).not.toContain(wrong.clientSecret);
    expect(onetrust.tokensIssued()).toBe(tokens + 1);
  });

  it('connectors test of a DataGrail connector shows what it cannot check as not checked, never as FAIL', async () => {
    const r = await run(['connectors', 'test', dgId]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain(`${dgId} (datagrail): ok`);
    expect(r.stdout).not.toContain('FAIL');
    expect(r.stdout).toMatch(/^ {2}ok {4}secrets present: /m);
    expect(r.stdout).toMatch(/^ {2}-- {4}webhook secret: Not checked: /m);
    expect(r.stdout).toMatch(/^ {2}-- {4}API key: Not checked: /m);
    const json = onlyDocument((await run(['connectors', 'test', dgId, '--json'])).stdout);
    expect(json.checks.map((c: Json) => [c.name, c.ok, c.skipped ?? false])).toEqual([
      ['secrets present', true, false],
      ['callback hosts', true, false],
      ['webhook secret', false, true],
      ['API key', false, true],
    ]);
  });

  it('connectors rotate-secret --keep-previous-for-seconds keeps the old webhook secret; end-previous-secrets ends it', async () => {
    // A workspace of its own: the requests its webhooks make stay out of the request and audit checks below.
    const own = await env.newWorkspace('CLI rotation');
    const created = await api('POST', '/v1/admin/connectors', own.adminKey, {
      vendor: 'datagrail',
      name: 'DataGrail rotating',
      config: { callbackHosts: ['127.0.0.1'] },
      secrets: { webhookSecret: 'dg-cli-old', apiKey: FAKE_DATAGRAIL_API_KEY },
    });
    expect(created.status, created.text).toBe(201);
    const id = created.json.id as string;
    const send = (secret: string) => {
      const w = datagrailWebhook({
        secret,
        body: datagrailBody({
          webhook_request_id: randomBytes(8).toString('hex'),
          identifiers: { email: `rot-${randomBytes(4).toString('hex')}@example.test` },
          callback_url: 'http://127.0.0.1:9/cb',
        }),
      });
      return call(env, 'POST', `/webhooks/datagrail/${id}`, { headers: w.headers, body: w.rawBody });
    };
    const input = JSON.stringify({ webhookSecret: 'dg-cli-new', apiKey: FAKE_DATAGRAIL_API_KEY });
    const [notNumber, tooLong] = await Promise.all([
      fails(['connectors', 'rotate-secret', id, '--secrets-stdin', '--keep-previous-for-seconds', 'a day'], 2, 'usage_error', { input }),
      fails(['connectors', 'rotate-secret', id, '--secrets-stdin', '--keep-previous-for-seconds', '604801'], 1, 'validation_failed', { input }),
    ]);
    expect(notNumber.message).toBe('--keep-previous-for-seconds must be a whole number of seconds (0 to 604800)');
    expect(tooLong.details?.map((d) => d.path)).toEqual(['keepPreviousForSeconds']);
    expect((await send('dg-cli-new')).status).toBe(401);

    const rotated = await ok(['connectors', 'rotate-secret', id, '--secrets-stdin', '--keep-previous-for-seconds', '3600'], { input });
    const fp = (v: string) => secretFingerprint(env.deps.digestKey, v);
    expect(rotated.secrets.webhookSecret).toEqual({
      set: true,
      fingerprint: fp('dg-cli-new'),
      previous: { fingerprint: fp('dg-cli-old'), expiresAt: expect.any(String) },
    });
    expect((await send('dg-cli-old')).status).toBe(200);
    expect((await send('dg-cli-new')).status).toBe(200);
    const shown = await run(['connectors', 'show', id]);
    expect(shown.code, shown.stderr).toBe(0);
    expect(shown.stdout).toContain(
      `webhookSecret (${fp('dg-cli-new')}; previous ${fp('dg-cli-old')} still accepted until ${rotated.secrets.webhookSecret.previous.expiresAt})`,
    );
    expect(shown.stdout + shown.stderr).not.toContain('dg-cli-old');

    const ended = await ok(['connectors', 'end-previous-secrets', id]);
    expect(ended.secrets.webhookSecret).toEqual({ set: true, fingerprint: fp('dg-cli-new') });
    expect((await send('dg-cli-old')).status).toBe(401);
    expect((await send('dg-cli-new')).status).toBe(200);
  });

  it('connectors disable: the webhook that answered now 404s; connectors enable: it verifies again', async () => {
    const body = datagrailBody({ callback_url: 'http://127.0.0.1:9/cb' });
    const forged = datagrailWebhook({ secret: 'not-the-secret', body });
    const before = await call(env, 'POST', `/webhooks/datagrail/${dgId}`, { headers: forged.headers, body: forged.rawBody });
    expect(before.status).toBe(401);
    const disabled = await ok(['connectors', 'disable', dgId]);
    expect(disabled).toMatchObject({ id: dgId, enabled: false });
    expect((await dbRow(dgId)).enabled).toBe(false);
    const signed = datagrailWebhook({ secret: DG_SECRET, body });
    const after = await call(env, 'POST', `/webhooks/datagrail/${dgId}`, { headers: signed.headers, body: signed.rawBody });
    expect(after.status).toBe(404);
    expect(await env.sql`select id from upstream_tickets where connector_id = ${dgId}`).toHaveLength(0);
    // And back: the webhook verifies again (a forged one is refused 401, no longer 404 for a disabled connector).
    const enabled = await ok(['connectors', 'enable', dgId]);
    expect(enabled).toMatchObject({ id: dgId, enabled: true });
    expect((await dbRow(dgId)).enabled).toBe(true);
    const again = await call(env, 'POST', `/webhooks/datagrail/${dgId}`, { headers: forged.headers, body: forged.rawBody });
    expect(again.status).toBe(401);
  });

  it('connectors list, show and test tell how the scheduled polls of a pull connector went', async () => {
    const transcend = await startFakeTranscend();
    try {
      const wsPoll = await env.newWorkspace('CLI poll');
      const silo = 'silo-cli-poll';
      const created = await api('POST', '/v1/admin/connectors', wsPoll.adminKey, {
        vendor: 'transcend',
        name: 'Pulled',
        config: transcend.config({ pull: { enabled: true, dataSiloId: silo, actions: ['ERASURE'], intervalMinutes: 5 } }),
        secrets: transcend.secrets,
      });
      expect(created.status, created.text).toBe(201);
      const id = created.json.id as string;
      transcend.fake.on(`GET /v1/data-silo/${silo}/pending-requests/ERASURE`, { status: 503, body: { error: 'down' } });
      expect((await connectorsTick(env.deps)).scheduled).toEqual([id]);
      await env.runJobs(); // the poll's first attempt fails

      const viaApi = (await api('GET', `/v1/admin/connectors/${id}`, wsPoll.adminKey)).json;
      expect(viaApi.pollStatus).toMatchObject({ consecutiveFailures: 1, lastFailure: { code: 'upstream_http_error' } });
      const [list, shown, shownJson, tested] = await Promise.all([
        run(['connectors', 'list', '--workspace', wsPoll.workspaceId]),
        run(['connectors', 'show', id]),
        ok(['connectors', 'show', id]),
        run(['connectors', 'test', id]),
      ]);
      expect(shownJson.pollStatus).toEqual(viaApi.pollStatus);
      expect(list.code, list.stderr).toBe(0);
      expect(list.stdout).toContain(`${id}  transcend  enabled   "Pulled"`);
      expect(list.stdout).toContain('poll FAILING (1 in a row: upstream_http_error)');
      expect(shown.stdout).toMatch(
        new RegExp(`^ {2}poll {8}FAILING: 1 in a row, last at ${viaApi.pollStatus.lastFailure.at.replace(/\./g, '\\.')}: upstream_http_error: Transcend pending-requests ERASURE: HTTP 503$`, 'm'),
      );
      expect(shown.stdout).toMatch(/^ {2}next poll {3}\d{4}-\d\d-\d\dT/m);
      // The test lists pending requests now (failing too), and says how the scheduled polls went.
      expect(tested.code).toBe(1);
      expect(tested.stdout).toMatch(/^ {2}FAIL {2}pending requests: Transcend pending-requests ERASURE: HTTP 503$/m);
      expect(tested.stdout).toMatch(/^ {2}scheduled polls: FAILING: 1 in a row, last at /m);

      transcend.fake.on(`GET /v1/data-silo/${silo}/pending-requests/ERASURE`, { status: 200, body: { items: [] } });
      await env.sql`update graphile_worker._private_jobs set run_at = now() where key = ${`poll:${id}`}`;
      await env.runJobs(); // its retry succeeds
      const again = await run(['connectors', 'list', '--workspace', wsPoll.workspaceId]);
      expect(again.stdout).toMatch(/poll ok \(last \d{4}-\d\d-\d\dT[^)]*\)$/m);
      // A connector receiving webhooks has no poll line.
      const other = await run(['connectors', 'list', '--workspace', ws.workspaceId]);
      expect(other.stdout).not.toContain('poll');
    } finally {
      await transcend.stop();
    }
  });
});

describe('requests and audit', () => {
  let failedId = '';
  let user: Awaited<ReturnType<typeof seedUser>>;

  it('requests list/show a failed request as the API does; bad filters exit 2', async () => {
    user = await seedUser(env, ws.ingestKey);
    const restoreErasures = await breakErasures(env, ws.workspaceId);
    try {
      const res = await api('POST', '/v1/privacy/requests', ws.privacyKey, { action: 'erase', userId: user.userId });
      expect(res.status, res.text).toBe(202);
      failedId = res.json.results[0].requestId;
      await env.runJobs();
    } finally {
      await restoreErasures();
    }
    const viaApi = (await api('GET', `/v1/privacy/requests/${failedId}`, ws.privacyKey)).json;
    expect(viaApi).toMatchObject({ status: 'failed', errorCode: 'db_P0001' });

    const [failedList, completeList, shown, status, limit, unknown] = await Promise.all([
      ok(['requests', 'list', '--workspace', ws.workspaceId, '--status', 'failed', '--limit', '5']),
      ok(['requests', 'list', '--workspace', ws.workspaceId, '--status', 'complete']),
      ok(['requests', 'show', failedId]),
      fails(['requests', 'list', '--workspace', ws.workspaceId, '--status', 'done'], 2, 'usage_error'),
      fails(['requests', 'list', '--workspace', ws.workspaceId, '--limit', '0'], 2, 'usage_error'),
      fails(['requests', 'show', 'req_unknown'], 1, 'not_found'),
    ]);
    expect(failedList).toEqual({ data: [viaApi] });
    expect(completeList).toEqual({ data: [] });
    expect(shown).toEqual(viaApi);
    expect(status.message).toBe('--status must be one of queued, running, complete, failed');
    expect(limit.message).toBe('--limit must be an integer from 1 to 100');
    expect(unknown.message).toBe('no such request: req_unknown');
  });

  it('requests list filters by user id and email as the API does, resolved identifiers included', async () => {
    // A workspace of its own: the audit checks below count this workspace's records.
    const wsF = await env.newWorkspace('CLI filters');
    const person = await seedUser(env, wsF.ingestKey, { events: 0 });
    const bystander = await seedUser(env, wsF.ingestKey, { events: 0 });
    const submit = async (body: Record<string, unknown>) => {
      const res = await api('POST', '/v1/privacy/requests', wsF.privacyKey, body);
      expect(res.status, res.text).toBe(202);
      return res.json.results[0].requestId as string;
    };
    // Sent by email, found by user id once it has run, and the other way round.
    const byEmail = await submit({ action: 'suppress', email: person.email.toUpperCase() });
    const byId = await submit({ action: 'unsuppress', userId: person.userId });
    await submit({ action: 'suppress', userId: bystander.userId });
    await env.runJobs();
    const viaApi = async (q: string) => (await api('GET', `/v1/privacy/requests?${q}`, wsF.privacyKey)).json;
    const list = (...flags: string[]) => ok(['requests', 'list', '--workspace', wsF.workspaceId, ...flags]);

    const [byUser, human, badEmail, emptyUser] = await Promise.all([
      list('--user-id', person.userId, '--status', 'complete'),
      run(['requests', 'list', '--workspace', wsF.workspaceId, '--email', ` ${person.email.toUpperCase()}`, '--limit', '5']),
      fails(['requests', 'list', '--workspace', wsF.workspaceId, '--email', 'not-an-email'], 2, 'usage_error'),
      fails(['requests', 'list', '--workspace', wsF.workspaceId, '--user-id', ''], 2, 'usage_error'),
    ]);
    expect(byUser.data.map((r: Json) => r.id)).toEqual([byId, byEmail]);
    expect(byUser).toEqual({ data: (await viaApi(`userId=${person.userId}&status=complete`)).data });
    expect(human.code, human.stderr).toBe(0);
    expect(human.stdout.trim().split('\n').map((l) => l.split(' ')[0])).toEqual([byId, byEmail]);
    expect(human.stdout).not.toContain(person.email);
    expect(badEmail.message).toBe('--email must be an email address');
    expect(emptyUser.message).toBe('--user-id must not be empty');
  });

  it('requests show in text says everything the JSON view does: vendor tickets with generation, reported audit, last error', async () => {
    // A workspace of its own: the audit checks below count this workspace's records.
    const wsT = await env.newWorkspace('CLI show');
    const dg = await startFakeDataGrail();
    try {
      const created = await api('POST', '/v1/admin/connectors', wsT.adminKey, {
        vendor: 'datagrail',
        name: 'DataGrail show',
        config: { callbackHosts: ['127.0.0.1'] },
        secrets: { webhookSecret: DG_SECRET, apiKey: FAKE_DATAGRAIL_API_KEY },
      });
      expect(created.status, created.text).toBe(201);
      const person = await seedUser(env, wsT.ingestKey, { events: 1 });
      // The erasure fails and DataGrail is told; the retry erases, and telling DataGrail that fails for now.
      const restoreErasures = await breakErasures(env, wsT.workspaceId);
      let requestId: string;
      try {
        const hook = datagrailWebhook({
          secret: DG_SECRET,
          body: datagrailBody({ webhook_request_id: 'dg-show-1', identifiers: { email: person.email }, callback_url: dg.callbackUrl() }),
        });
        const res = await call(env, 'POST', `/webhooks/datagrail/${created.json.id}`, { headers: hook.headers, body: hook.rawBody });
        expect(res.status, res.text).toBe(200);
        requestId = res.json.received[0].requestId;
        await env.runJobs();
      } finally {
        await restoreErasures();
      }
      dg.fake.on(DATAGRAIL_CALLBACK_ROUTE, { status: 503, body: { error: 'down' } });
      await ok(['requests', 'retry', requestId]);
      await env.runJobs();

      const viaApi = (await api('GET', `/v1/privacy/requests/${requestId}`, wsT.privacyKey)).json;
      expect(viaApi).toMatchObject({ status: 'complete', outcome: 'erased', upstreamRef: 'dg-show-1' });
      const [ticket] = viaApi.upstream;
      expect(ticket).toMatchObject({ generation: 1, reportedAuditRecordId: expect.any(String), lastError: expect.stringContaining('HTTP 503') });
      expect(ticket.reportedAuditRecordId).not.toBe(viaApi.auditRecordId);

      const [json, text] = await Promise.all([ok(['requests', 'show', requestId]), run(['requests', 'show', requestId])]);
      expect(json).toEqual(viaApi);
      expect(text.code, text.stderr).toBe(0);
      const out = text.stdout;
      // Every value of the JSON view appears in the text.
      const leaves = (v: Json): string[] =>
        v === null ? [] : typeof v === 'object' ? Object.values(v).flatMap(leaves) : [String(v)];
      for (const value of leaves(viaApi)) expect(out, value).toContain(value);
      // Each under its name, so an operator can tell the two audit ids and the request's fields from the ticket's.
      const line = (label: string) => out.split('\n').find((l) => l.startsWith(`  ${label}  `)) ?? '';
      expect(line('upstream ref')).toMatch(/^ {2}upstream ref +dg-show-1$/);
      expect(line('audit')).toMatch(new RegExp(`^ {2}audit +${viaApi.auditRecordId}$`));
      expect(line('upstream')).toMatch(/^ {2}upstream +pending \(1 ticket\)$/);
      expect(line('ticket')).toMatch(new RegExp(`^ {2}ticket +${ticket.ticketId} {2}pending {2}attempts ${ticket.attempts} {2}generation 1$`));
      expect(out).toContain(`connector ${ticket.connectorId}   vendor ref dg-show-1`);
      expect(out).toContain(`next attempt ${ticket.nextAttemptAt}   delivered ${ticket.deliveredAt}   reported audit ${ticket.reportedAuditRecordId}`);
      expect(out).toContain(`last error: ${ticket.lastError}`);
      expect(out).not.toContain(person.email);
    } finally {
      await dg.fake.stop();
    }
  });

  it('requests retry queues a failed request again; it then erases the user; a second retry exits 1', async () => {
    const queued = await ok(['requests', 'retry', failedId]);
    expect(queued).toMatchObject({ id: failedId, status: 'queued', outcome: null, errorCode: null, attempts: 0, auditRecordId: expect.any(String) });
    const [row] = await env.sql`select status, subject_sealed from dsr_requests where id = ${failedId}`;
    expect(row).toEqual({ status: 'queued', subject_sealed: null });
    await env.runJobs();
    const done = (await api('GET', `/v1/privacy/requests/${failedId}`, ws.privacyKey)).json;
    expect(done).toMatchObject({ status: 'complete', outcome: 'erased' });
    expect(await userFootprint(env, ws.workspaceId, user.userId)).toMatchObject({ profiles: 0, events: 0, messages: 0, questions: 0 });
    const again = await fails(['requests', 'retry', failedId], 1, 'conflict');
    expect(again.message).toBe('only a failed request can be retried (this one is complete)');
    expect((await fails(['requests', 'retry', 'req_unknown'], 1, 'not_found')).message).toBe('no such request: req_unknown');
  });

  it('audit show gives the record with its chain proof, as the API does', async () => {
    const { auditRecordId } = (await api('GET', `/v1/privacy/requests/${failedId}`, ws.privacyKey)).json;
    const viaApi = (await api('GET', `/v1/privacy/audit/${auditRecordId}`, ws.privacyKey)).json;
    const [shown, unknown] = await Promise.all([ok(['audit', 'show', auditRecordId]), fails(['audit', 'show', 'aud_unknown'], 1, 'not_found')]);
    expect(shown).toEqual(viaApi);
    expect(shown.chain).toMatchObject({ algorithm: 'sha256', position: 2, intact: true });
    expect(unknown.message).toBe('no such audit record: aud_unknown');
  });

  it('audit verify: ok, then after a row is altered behind the trigger, exit 1 naming the position', async () => {
    const [verified, human] = await Promise.all([
      ok(['audit', 'verify', '--workspace', ws.workspaceId]),
      run(['audit', 'verify', '--workspace', ws.workspaceId]),
    ]);
    const [head] = await env.sql`select id, hash from audit_records where workspace_id = ${ws.workspaceId} and chain_seq = 2`;
    expect(verified).toEqual({
      ok: true,
      workspaces: [
        { workspaceId: ws.workspaceId, ok: true, records: 2, head: { position: 2, hash: head!.hash, recordId: head!.id }, legacyRecords: 0, firstBreak: null },
      ],
    });
    expect(human.code).toBe(0);
    expect(human.stdout).toBe(`${ws.workspaceId}: ok 2 records, head #2 ${head!.id} ${(head!.hash as string).slice(0, 16)}…\n`);

    const [first] = await env.sql`select id from audit_records where workspace_id = ${ws.workspaceId} and chain_seq = 1`;
    await env.sql.begin(async (tx) => {
      await tx.unsafe('alter table audit_records disable trigger all');
      await tx`update audit_records set error_code = null where id = ${first!.id}`;
      await tx.unsafe('alter table audit_records enable trigger all');
    });

    const [all, broken, tampered] = await Promise.all([
      run(['audit', 'verify', '--json']),
      run(['audit', 'verify', '--workspace', ws.workspaceId]),
      ok(['audit', 'show', first!.id]),
    ]);
    expect(all.code).toBe(1);
    const report = onlyDocument(all.stdout);
    expect(report.ok).toBe(false);
    const mine = report.workspaces.find((w: Json) => w.workspaceId === ws.workspaceId);
    expect(mine).toMatchObject({ ok: false, records: 0, firstBreak: { problem: 'hash_mismatch', position: 1, recordId: first!.id } });
    expect(report.workspaces.filter((w: Json) => w.workspaceId !== ws.workspaceId).every((w: Json) => w.ok)).toBe(true);

    expect(broken.code).toBe(1);
    expect(broken.stdout).toBe(
      `${ws.workspaceId}: BROKEN at position 1 (${first!.id}): hash_mismatch — ` +
        'the stored fields no longer match the record hash: the row was changed after it was written\n',
    );
    expect(tampered.chain.intact).toBe(false);
  });
});

describe('holds', () => {
  it('holds list shows the holds in force as the API lists them, never an identifier; bad arguments exit 2', async () => {
    const w = await env.newWorkspace('CLI holds');
    const u = await seedUser(env, w.ingestKey);
    const placed = await api('POST', '/v1/privacy/requests', w.privacyKey, {
      requests: [
        { action: 'hold', email: u.email, externalRequestId: 'matter-9' },
        { action: 'hold', userId: 'held-before-any-profile' },
      ],
    });
    expect(placed.status, placed.text).toBe(202);
    await env.runJobs();
    const viaApi = (await api('GET', '/v1/privacy/holds', w.privacyKey)).json;
    expect(viaApi.data).toHaveLength(2);

    const [listed, limited, human, empty, missing, badLimit, unknown] = await Promise.all([
      ok(['holds', 'list', '--workspace', w.workspaceId]),
      ok(['holds', 'list', '--workspace', w.workspaceId, '--limit', '1']),
      run(['holds', 'list', '--workspace', w.workspaceId]),
      ok(['holds', 'list', '--workspace', ws.workspaceId]),
      fails(['holds', 'list'], 2, 'usage_error'),
      fails(['holds', 'list', '--workspace', w.workspaceId, '--limit', '101'], 2, 'usage_error'),
      fails(['holds', 'list', '--workspace', 'ws_unknown'], 1, 'not_found'),
    ]);
    expect(listed).toEqual({ data: viaApi.data });
    expect(limited).toEqual({ data: [viaApi.data[0]] });
    expect(empty).toEqual({ data: [] });
    expect(human.code, human.stderr).toBe(0);
    const [newest, oldest] = viaApi.data as { requestId: string; placedAt: string; actor: { id: string } }[];
    expect(human.stdout).toBe(
      `${newest!.requestId}  user_id  placed ${newest!.placedAt}  by api_key ${newest!.actor.id} (api)\n` +
        `${oldest!.requestId}  email    placed ${oldest!.placedAt}  by api_key ${oldest!.actor.id} (api)  external id matter-9\n`,
    );
    for (const out of [human.stdout, JSON.stringify(listed)]) {
      expect(out).not.toContain(u.email);
      expect(out).not.toContain('held-before-any-profile');
    }
    expect(missing.message).toBe('holds list needs --workspace <id>');
    expect(badLimit.message).toBe('--limit must be an integer from 1 to 100');
    expect(unknown.message).toBe('no such workspace: ws_unknown');

    // A release by the user id of a subject held by email lifts nothing, and requests show says the hold stays.
    const released = await api('POST', '/v1/privacy/requests', w.privacyKey, { action: 'release_hold', userId: u.userId });
    const releaseId = released.json.results[0].requestId as string;
    await env.runJobs();
    const [shownJson, shown] = await Promise.all([ok(['requests', 'show', releaseId]), run(['requests', 'show', releaseId])]);
    expect(shownJson).toMatchObject({ outcome: 'released', holdsInForce: 1 });
    expect(shown.stdout).toContain('\n  holds         1 still in force (placed with another identifier, or newer)\n');
  });
});

describe('service commands', () => {
  it('a DATABASE_URL the server refuses (no such database, wrong password) exits 1 saying why, never the password', async () => {
    const noDb = new URL(env.url);
    noDb.pathname = '/dsr_cli_no_such_database';
    const missing = await fails(['workspaces', 'create', '--name', 'Nowhere'], 1, 'config_error', {
      env: { DATABASE_URL: noDb.toString() },
    });
    expect(missing.message).toBe(
      `cannot connect to the database at postgres://${noDb.hostname}:${noDb.port}/dsr_cli_no_such_database (DATABASE_URL): ` +
        'database "dsr_cli_no_such_database" does not exist',
    );

    // A server that checks passwords says so; one that trusts the address says the database is missing. Either way
    // the operator reads why, and the password is not repeated.
    const badPassword = new URL(noDb);
    badPassword.password = 'cli-canary-password';
    const refused = await fails(['workspaces', 'create', '--name', 'Nowhere'], 1, 'config_error', {
      env: { DATABASE_URL: badPassword.toString() },
    });
    expect(refused.message).toMatch(/^cannot connect to the database at postgres:\/\/[^@]+ \(DATABASE_URL\): (password authentication failed|database ".*" does not exist)/);
    expect(refused.stdout + refused.stderr).not.toContain('cli-canary-password');
  });

  it('migrate reports the database it brought up to date', async () => {
    const out = await ok(['migrate']);
    const u = new URL(env.url);
    expect(out).toEqual({ migrated: true, database: `postgres://${u.hostname}:${u.port}${u.pathname}` });
  });

  it('a DATABASE_URL role that may not run the migrations: exit 1 with the reason, not a bare code or "Failed query"', async () => {
    const role = `dsr_cli_noowner_${randomBytes(4).toString('hex')}`;
    await env.sql.unsafe(`create role ${role} login password 'not-an-owner-pw'`);
    try {
      const asRole = new URL(env.url);
      asRole.username = role;
      asRole.password = 'not-an-owner-pw';
      const r = await fails(['migrate'], 1, 'config_error', { env: { DATABASE_URL: asRole.toString() } });
      expect(r.message).toMatch(
        /^applying the migrations to the database at postgres:\/\/[^@]+ \(DATABASE_URL\) failed: permission denied for \w+ \S+ \(SQLSTATE 42501\); /,
      );
      expect(r.message).toContain('the role in DATABASE_URL must own');
      expect(r.stdout + r.stderr).not.toContain('not-an-owner-pw');
    } finally {
      await env.sql.unsafe(`drop owned by ${role}`);
      await env.sql.unsafe(`drop role ${role}`);
    }
  });

  it('serve on a port already in use exits 1 saying so, as npm start does, not as an unexpected error', async () => {
    const blocker = net.createServer();
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', () => resolve()));
    const port = (blocker.address() as net.AddressInfo).port;
    try {
      const r = await run(['serve', '--role', 'web'], { env: { HOST: '127.0.0.1', PORT: String(port) } });
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr).toContain(`error: listen EADDRINUSE: address already in use 127.0.0.1:${port}; set PORT (or HOST) to a free address`);
    } finally {
      blocker.close();
    }
  });

  it('serve --role web answers /healthz and stops on SIGTERM; worker runs queued jobs; a bad role exits 2', async () => {
    const bad = await run(['serve', '--role', 'worker']);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain('--role must be one of web, all');

    const web = startService(cliEnv(env, { PORT: '0' }), ['serve', '--role', 'web'], ['bin/dsr-connector.mjs']);
    const base = await web.ready;
    expect(web.output()).toContain('dsr-connector (web)');
    const health = await fetch(`${base}/healthz`);
    expect(health.status).toBe(200);
    expect(await health.json()).toEqual({ status: 'ok', database: 'ok' });

    // The web role runs no jobs: a request stays queued until the worker takes it.
    const res = await api('POST', '/v1/privacy/requests', ws.privacyKey, { action: 'suppress', userId: 'cli-worker-user' });
    const id = res.json.results[0].requestId as string;
    const worker = startService(cliEnv(env), ['worker'], ['bin/dsr-connector.mjs']);
    await worker.ready;
    expect(worker.output()).toContain('dsr-connector (worker)');
    await poll(async () => ((await env.sql`select status from dsr_requests where id = ${id}`)[0]!.status === 'complete' ? true : undefined));

    web.proc.kill('SIGTERM');
    worker.proc.kill('SIGTERM');
    expect(await web.exited).toBe(0);
    expect(await worker.exited).toBe(0);
  });
});

describe('keys rotate-master', () => {
  let renv: TestEnv;
  let transcend: FakeTranscend;
  const extraDeps: { http: { close(): Promise<void> } }[] = [];

  beforeAll(async () => {
    renv = await createTestEnv();
    transcend = await startFakeTranscend();
  });
  afterAll(async () => {
    for (const d of extraDeps) await d.http.close();
    await transcend?.stop();
    await renv?.close();
  });

  /** A server process's wiring over the same database, with its own master key(s). */
  function serverWith(sealer: Sealer) {
    const deps = createNodeDeps({
      env: parseEnv({ OUTBOUND_ALLOW_PRIVATE_NETWORKS: 'true', OUTBOUND_TIMEOUT_MS: '2000', REPORT_BACKOFF_BASE_MS: '20', REPORT_BACKOFF_MAX_MS: '200' }),
      database: renv.database,
      digestKey: renv.deps.digestKey,
      sealer,
      logger: createLogger('warn', renv.logs),
    });
    extraDeps.push(deps);
    const app = newApp(deps);
    return {
      webhook: async (connectorId: string, email: string) => {
        const w = await transcend.webhook({ profile: { identifier: email, type: 'email' } });
        const res = await app.request(`/webhooks/transcend/${connectorId}`, { method: 'POST', headers: w.headers, body: w.body });
        expect(res.status, await res.clone().text()).toBe(200);
        return { ...((await res.json()) as { received: { ticketId: string; requestId: string }[] }).received[0]!, nonce: w.headers['x-transcend-nonce']! };
      },
      runJobs: () => runDueJobs(renv.sql, { connectionString: renv.url, taskList: taskList(deps), logger: deps.logger, outbox: deps.outbox }),
    };
  }

  it('re-seals everything under the new key while servers on the old key (knowing the new) and on the new key keep working', async () => {
    const A = renv.encryptionKey;
    const B = randomBytes(32);
    const onA = { on: renv };
    const onB = { on: renv, env: { DSR_ENCRYPTION_KEY: B.toString('base64') } };
    const rotating = { on: renv, env: { DSR_ENCRYPTION_KEY: B.toString('base64'), DSR_ENCRYPTION_KEYS_PREVIOUS: A.toString('base64') } };
    const wsR = await renv.newWorkspace('Rotation');

    // Under key A: a connector (through the CLI), a failed request keeping its identifier, a ticket holding a nonce.
    const connector = await ok(
      ['connectors', 'add', '--workspace', wsR.workspaceId, '--vendor', 'transcend', '--name', 'Transcend', '--config',
        JSON.stringify(transcend.config({ identifierTypes: { email: 'email' } })), '--secrets-stdin'],
      { ...onA, input: JSON.stringify(transcend.secrets) },
    );
    const u = await seedUser(renv, wsR.ingestKey);
    await renv.sql.unsafe(`
      create function cli_rot_fail() returns trigger language plpgsql as $$ begin raise exception 'injected'; end $$;
      create trigger cli_rot_fail before delete on topic_questions for each row execute function cli_rot_fail();`);
    let failedId: string;
    try {
      const res = await call(renv, 'POST', '/v1/privacy/requests', { key: wsR.privacyKey, body: { action: 'erase', userId: u.userId } });
      failedId = res.json.results[0].requestId;
      await renv.runJobs();
    } finally {
      await renv.sql.unsafe('drop trigger cli_rot_fail on topic_questions; drop function cli_rot_fail();');
    }
    const w1 = await serverWith(new Sealer(A)).webhook(connector.id, 'first@example.test');

    const sealed = async () => ({
      connector: (await renv.sql`select secrets_sealed as s from connectors where id = ${connector.id}`)[0]!.s as string,
      ticket: (await renv.sql`select secret_sealed as s from upstream_tickets where id = ${w1.ticketId}`)[0]!.s as string,
      subject: (await renv.sql`select subject_sealed as s from dsr_requests where id = ${failedId}`)[0]!.s as string,
    });
    for (const v of Object.values(await sealed())) expect(v).toMatch(new RegExp(`^v1\\.${keyIdOf(A)}\\.`));

    const report = await ok(['keys', 'rotate-master'], rotating);
    expect(report).toEqual({
      keyId: keyIdOf(B),
      connectorSecrets: { resealed: 1, current: 0, remaining: 0, unreadable: [] },
      previousInboundSecrets: { resealed: 0, current: 0, remaining: 0, unreadable: [] },
      ticketSecrets: { resealed: 1, current: 0, remaining: 0, unreadable: [] },
      failedRequestSubjects: { resealed: 1, current: 0, remaining: 0, unreadable: [] },
    });
    const after = await sealed();
    for (const v of Object.values(after)) expect(v).toMatch(new RegExp(`^v1\\.${keyIdOf(B)}\\.`));
    expect(await ok(['keys', 'rotate-master'], rotating)).toEqual({
      keyId: keyIdOf(B),
      connectorSecrets: { resealed: 0, current: 1, remaining: 0, unreadable: [] },
      previousInboundSecrets: { resealed: 0, current: 0, remaining: 0, unreadable: [] },
      ticketSecrets: { resealed: 0, current: 1, remaining: 0, unreadable: [] },
      failedRequestSubjects: { resealed: 0, current: 1, remaining: 0, unreadable: [] },
    });

    // Same plaintexts, openable by both kinds of server, no longer by A alone.
    const row = await connectorRow(renv, connector.id);
    for (const s of [new Sealer(A, [B]), new Sealer(B)]) {
      expect(openConnector(s, row).instance.secrets).toEqual(transcend.secrets);
      expect(s.open(after.ticket, ticketSecretContext(w1.ticketId))).toBe(w1.nonce);
      expect(s.open(after.subject, subjectSealContext(failedId))).toBe(u.userId);
    }
    expect(() => new Sealer(A).open(after.connector, secretsContext(connector.id))).toThrow(/unknown key id/);

    // A server still on A that knows B: verifies a signed webhook with the re-sealed secrets and reports both
    // tickets, the re-sealed nonce included.
    const onOld = serverWith(new Sealer(A, [B]));
    const w2 = await onOld.webhook(connector.id, 'second@example.test');
    await onOld.runJobs();
    const delivered = () => transcend.fake.callsTo('PUT /v1/data-silo').map((c) => c.headers['x-transcend-nonce']);
    expect(delivered()).toEqual(expect.arrayContaining([w1.nonce, w2.nonce]));

    // A server on B alone: a webhook, and the failed request retried through the CLI on B, run to completion.
    const onNew = serverWith(new Sealer(B));
    const w3 = await onNew.webhook(connector.id, 'third@example.test');
    expect(await ok(['requests', 'retry', failedId], onB)).toMatchObject({ id: failedId, status: 'queued' });
    await onNew.runJobs();
    expect(delivered()).toEqual(expect.arrayContaining([w3.nonce]));
    const tickets = await renv.sql`select status from upstream_tickets where connector_id = ${connector.id}`;
    expect(tickets.map((t) => t.status)).toEqual(['delivered', 'delivered', 'delivered']);
    const [req] = await renv.sql`select status, outcome from dsr_requests where id = ${failedId}`;
    expect(req).toEqual({ status: 'complete', outcome: 'erased' });
    expect(await userFootprint(renv, wsR.workspaceId, u.userId)).toMatchObject({ profiles: 0, events: 0 });

    // A value no configured key opens (sealed for another row): exit 1, a conflict naming the row, nothing lost;
    // the old key must stay. Once the value is mended, the run succeeds.
    const C = randomBytes(32);
    const toC = { on: renv, env: { DSR_ENCRYPTION_KEY: C.toString('base64'), DSR_ENCRYPTION_KEYS_PREVIOUS: B.toString('base64') } };
    const good = (await sealed()).connector;
    await renv.sql`update connectors set secrets_sealed = ${new Sealer(B).seal('{}', secretsContext('con_elsewhere'))}
                   where id = ${connector.id}`;
    const refused = await fails(['keys', 'rotate-master'], 1, 'conflict', toC);
    expect(refused.message).toContain(`not everything is sealed under master key ${keyIdOf(C)} yet`);
    expect(refused.details).toEqual([
      { path: 'connector secrets', message: `no configured key opens rows ${connector.id}: re-enter or clear them` },
    ]);
    await renv.sql`update connectors set secrets_sealed = ${good} where id = ${connector.id}`;
    expect(await ok(['keys', 'rotate-master'], toC)).toMatchObject({
      keyId: keyIdOf(C),
      connectorSecrets: { resealed: 1, remaining: 0, unreadable: [] },
    });
  });
});
