import { spawn } from 'node:child_process';
import http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import pkg from '../../package.json' with { type: 'json' };
import { freePort } from '../../src/lib/net.ts';
import {
  addressAllowed,
  OutboundError,
  retryAfterMs,
  USER_AGENT,
  type HttpClient,
  type OutboundErrorCode,
  type OutboundOptions,
} from '../../src/lib/outbound.ts';
import { createFetchHttpClient } from '../../src/lib/outbound-fetch.ts';
import { createHttpClient } from '../../src/lib/outbound-node.ts';
import { MemoryCache } from '../../src/upstream/cache.ts';

interface Seen {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
  body: string;
}

interface TestServer {
  url: string;
  port: number;
  requests: Seen[];
  /** TCP connections accepted, whether or not a request followed. */
  connections: number;
  close(): Promise<void>;
}

type Handler = (req: Seen, res: http.ServerResponse) => void;

const servers: TestServer[] = [];
const clients: HttpClient[] = [];

/** A real HTTP server on loopback that records every connection and request before handing it to `handler`. */
async function startServer(handler: Handler): Promise<TestServer> {
  const sockets = new Set<Socket>();
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const seen = { method: req.method ?? '', url: req.url ?? '', headers: req.headers, body: Buffer.concat(chunks).toString('utf8') };
      state.requests.push(seen);
      handler(seen, res);
    });
  });
  server.on('connection', (s: Socket) => {
    state.connections++;
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  const port = (server.address() as AddressInfo).port;
  const state: TestServer = {
    url: `http://127.0.0.1:${port}`,
    port,
    requests: [],
    connections: 0,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
  servers.push(state);
  return state;
}

/** Runs an ES module snippet in a fresh Node process with the tsx loader (cwd: the project root). */
function runChild(code: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '--eval', code], {
      cwd: new URL('../..', import.meta.url),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString('utf8')));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString('utf8')));
    child.on('error', reject);
    child.on('close', (exitCode) => resolve({ code: exitCode, stdout, stderr }));
  });
}

function client(overrides: Partial<OutboundOptions> = {}): HttpClient {
  const c = createHttpClient({ allowPrivateNetworks: true, timeoutMs: 2000, maxResponseBytes: 1024, ...overrides });
  clients.push(c);
  return c;
}

/** The OutboundError a call rejects with (fails the test if it resolves or throws something else). */
async function outboundError(p: Promise<unknown>): Promise<OutboundError> {
  const err = await p.then(
    (v) => {
      throw new Error(`expected an OutboundError, got a response: ${JSON.stringify(v)}`);
    },
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(OutboundError);
  return err as OutboundError;
}

async function expectCode(p: Promise<unknown>, code: OutboundErrorCode): Promise<OutboundError> {
  const err = await outboundError(p);
  expect(err.code, err.message).toBe(code);
  return err;
}

afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => s.close()));
});
afterAll(async () => {
  await Promise.all(clients.splice(0).map((c) => c.close()));
});

describe('request basics', () => {
  it('sends user-agent dsr-connector/<package version> and accept: application/json; answers lower-case headers', async () => {
    const srv = await startServer((_req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/json', 'X-Custom-Thing': 'yes' });
      res.end('{"ok":true}');
    });
    const res = await client().request(`${srv.url}/ping?x=1`);
    expect(USER_AGENT).toBe(`dsr-connector/${pkg.version}`);
    expect(srv.requests).toHaveLength(1);
    expect(srv.requests[0]!.method).toBe('GET');
    expect(srv.requests[0]!.url).toBe('/ping?x=1');
    expect(srv.requests[0]!.headers['user-agent']).toBe(`dsr-connector/${pkg.version}`);
    expect(srv.requests[0]!.headers.accept).toBe('application/json');
    expect(res.status).toBe(200);
    expect(res.text).toBe('{"ok":true}');
    expect(res.headers['content-type']).toBe('application/json');
    expect(res.headers['x-custom-thing']).toBe('yes');
  });

  it('sends a JSON body as application/json', async () => {
    const srv = await startServer((_req, res) => res.end('done'));
    const payload = { a: 1, nested: { b: ['x', 'ü'] } };
    const res = await client().request(`${srv.url}/json`, { method: 'POST', json: payload, headers: { 'x-extra': '1' } });
    expect(res.status).toBe(200);
    const seen = srv.requests[0]!;
    expect(seen.method).toBe('POST');
    expect(seen.headers['content-type']).toBe('application/json');
    expect(seen.headers['x-extra']).toBe('1');
    expect(JSON.parse(seen.body)).toEqual(payload);
  });

  it('sends a form body as application/x-www-form-urlencoded', async () => {
    const srv = await startServer((_req, res) => res.end());
    await client().request(`${srv.url}/token`, {
      method: 'POST',
      form: { grant_type: 'client_credentials', client_secret: 'a b&c=d' },
    });
    const seen = srv.requests[0]!;
    expect(seen.headers['content-type']).toBe('application/x-www-form-urlencoded');
    expect(seen.body).toBe('grant_type=client_credentials&client_secret=a+b%26c%3Dd');
    expect(Object.fromEntries(new URLSearchParams(seen.body))).toEqual({
      grant_type: 'client_credentials',
      client_secret: 'a b&c=d',
    });
  });

  it('keeps a content-type the caller set', async () => {
    const srv = await startServer((_req, res) => res.end());
    await client().request(srv.url, {
      method: 'PUT',
      json: { a: 1 },
      headers: { 'content-type': 'application/vnd.api+json' },
    });
    expect(srv.requests[0]!.headers['content-type']).toBe('application/vnd.api+json');
  });

  it('returns non-2xx answers as responses, not errors', async () => {
    const srv = await startServer((_req, res) => {
      res.writeHead(503, { 'retry-after': '7' });
      res.end('busy');
    });
    const res = await client().request(srv.url);
    expect(res).toMatchObject({ status: 503, text: 'busy' });
    expect(retryAfterMs(res.headers)).toBe(7000);
  });
});

describe('response size cap', () => {
  // Runs in a child process: the refusal currently crashes the process (see the bug note below), which inside the
  // test worker would surface as an unhandled error attributed to whichever test runs next.
  it('refuses a response whose content-length is over maxResponseBytes, and the process survives it', async () => {
    const srv = await startServer((_req, res) => {
      const body = 'x'.repeat(2000);
      res.writeHead(200, { 'content-length': String(body.length) });
      res.end(body);
    });
    const child = await runChild(`
      import { createHttpClient } from './src/lib/outbound-node.ts';
      const c = createHttpClient({ allowPrivateNetworks: true, timeoutMs: 2000, maxResponseBytes: 1000 });
      try {
        await c.request(${JSON.stringify(srv.url)});
        console.log(JSON.stringify({ outcome: 'response' }));
      } catch (err) {
        console.log(JSON.stringify({ outcome: 'error', name: err.name, code: err.code, retryable: err.retryable, message: err.message }));
      }
      await new Promise((r) => setTimeout(r, 300));
      await c.close();
      console.log(JSON.stringify({ outcome: 'alive' }));
    `);
    const lines = child.stdout.split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines[0], child.stdout + child.stderr).toMatchObject({
      outcome: 'error',
      name: 'OutboundError',
      code: 'response_too_large',
      retryable: false,
    });
    expect(String(lines[0]!.message)).toContain('127.0.0.1');
    expect(srv.requests).toHaveLength(1);
    // BUG (src/lib/outbound-node.ts:49-51 with src/lib/outbound.ts:150-153): destroying the undici body before it
    // was read makes it emit 'error' (RequestAbortedError) with no listener: an uncaught exception, exit code 1.
    expect(child.stderr).not.toMatch(/Unhandled 'error' event|RequestAbortedError/);
    expect(lines.at(-1), child.stdout + child.stderr).toEqual({ outcome: 'alive' });
    expect(child.code).toBe(0);
  });

  it('refuses a chunked response without content-length once it passes the cap', async () => {
    const srv = await startServer((_req, res) => {
      res.writeHead(200, { 'content-type': 'text/plain' });
      let sent = 0;
      const tick = () => {
        if (res.destroyed) return;
        if (sent >= 20) return void res.end();
        sent++;
        res.write('y'.repeat(200));
        setTimeout(tick, 5);
      };
      tick();
    });
    await expectCode(client({ maxResponseBytes: 1000 }).request(srv.url), 'response_too_large');
    expect(srv.requests).toHaveLength(1);
  });

  it('accepts a response of exactly maxResponseBytes, chunked or not', async () => {
    const srv = await startServer((req, res) => {
      if (req.url === '/chunked') {
        res.write('a'.repeat(500));
        res.end('b'.repeat(500));
      } else {
        res.writeHead(200, { 'content-length': '1000' });
        res.end('c'.repeat(1000));
      }
    });
    const c = client({ maxResponseBytes: 1000 });
    expect((await c.request(`${srv.url}/chunked`)).text).toHaveLength(1000);
    expect((await c.request(`${srv.url}/plain`)).text).toHaveLength(1000);
  });
});

describe('redirects', () => {
  it('follows a same-origin 307, keeping the method, body and content type', async () => {
    const srv = await startServer((req, res) => {
      if (req.url === '/old') {
        res.writeHead(307, { location: '/new?q=1' });
        return void res.end();
      }
      res.end('landed');
    });
    const res = await client().request(`${srv.url}/old`, { method: 'POST', json: { keep: 'me' } });
    expect(res).toMatchObject({ status: 200, text: 'landed' });
    expect(srv.requests.map((r) => `${r.method} ${r.url}`)).toEqual(['POST /old', 'POST /new?q=1']);
    expect(srv.requests[1]!.body).toBe('{"keep":"me"}');
    expect(srv.requests[1]!.headers['content-type']).toBe('application/json');
  });

  it('follows a 308 like a 307', async () => {
    const srv = await startServer((req, res) => {
      if (req.url === '/old') {
        res.writeHead(308, { location: `${srv.url}/new` });
        return void res.end();
      }
      res.end('ok');
    });
    await client().request(`${srv.url}/old`, { method: 'PUT', json: { a: 1 } });
    expect(srv.requests.map((r) => `${r.method} ${r.url} ${r.body}`)).toEqual(['PUT /old {"a":1}', 'PUT /new {"a":1}']);
  });

  // Every POST and PUT this client sends is a report to a vendor (or a token request): the body is the point. Turning
  // it into a body-less GET on 301/302/303, as browsers do, let a vendor's redirect pass a GET's 2xx off as the
  // report's delivery (the ticket then counted delivered, its nonce wiped) although the report was never received.
  it.each([301, 302])('re-sends a POST or PUT with its method, body and content type on %i', async (status) => {
    const srv = await startServer((req, res) => {
      if (req.url!.startsWith('/old')) {
        res.writeHead(status, { location: '/new' });
        return void res.end();
      }
      res.end('landed');
    });
    for (const method of ['POST', 'PUT'] as const) {
      const res = await client().request(`${srv.url}/old`, { method, json: { keep: 'me' } });
      expect(res).toMatchObject({ status: 200, text: 'landed' });
    }
    expect(srv.requests.map((r) => `${r.method} ${r.url} ${r.body} ${r.headers['content-type']}`)).toEqual([
      'POST /old {"keep":"me"} application/json',
      'POST /new {"keep":"me"} application/json',
      'PUT /old {"keep":"me"} application/json',
      'PUT /new {"keep":"me"} application/json',
    ]);
  });

  it('refuses a 303 to a POST or PUT (it would become a GET without the body); nothing is sent to its location', async () => {
    const srv = await startServer((req, res) => {
      if (req.url === '/report') {
        res.writeHead(303, { location: '/result?secret-path' });
        return void res.end();
      }
      res.end('result');
    });
    for (const method of ['POST', 'PUT'] as const) {
      const err = await expectCode(client().request(`${srv.url}/report`, { method, json: { status: 'done' } }), 'redirect_refused');
      expect(err.retryable).toBe(false);
      expect(err.message).toBe(`refused: HTTP 303 from 127.0.0.1 to a ${method} (it would become a GET without its body)`);
    }
    expect(srv.requests.map((r) => `${r.method} ${r.url}`)).toEqual(['POST /report', 'PUT /report']);
  });

  it.each([301, 302, 303])('follows a GET on %i as a GET', async (status) => {
    const srv = await startServer((req, res) => {
      if (req.url === '/list') {
        res.writeHead(status, { location: '/list/' });
        return void res.end();
      }
      res.end('list');
    });
    expect((await client().request(`${srv.url}/list`)).text).toBe('list');
    expect(srv.requests.map((r) => `${r.method} ${r.url}`)).toEqual(['GET /list', 'GET /list/']);
    // Headers travel on (same origin).
    expect(srv.requests[1]!.headers['user-agent']).toBe(USER_AGENT);
  });

  it('refuses a redirect to another origin (another loopback port); the other server receives nothing', async () => {
    const other = await startServer((_req, res) => res.end('should not be reached'));
    const srv = await startServer((_req, res) => {
      res.writeHead(307, { location: `${other.url}/steal` });
      res.end();
    });
    const err = await expectCode(
      client().request(`${srv.url}/start`, { method: 'POST', headers: { authorization: 'Bearer s3cret' }, json: {} }),
      'redirect_refused',
    );
    expect(err.retryable).toBe(false);
    expect(srv.requests).toHaveLength(1);
    expect(other.requests).toHaveLength(0);
    expect(other.connections).toBe(0);
    expect(err.message).not.toContain('steal');
  });

  it('refuses a redirect to the same host under another scheme or host name', async () => {
    const srv = await startServer((req, res) => {
      const location = req.url === '/https' ? `https://127.0.0.1:${srv.port}/x` : `http://localhost:${srv.port}/x`;
      res.writeHead(302, { location });
      res.end();
    });
    await expectCode(client().request(`${srv.url}/https`), 'redirect_refused');
    await expectCode(client().request(`${srv.url}/name`), 'redirect_refused');
    expect(srv.requests.map((r) => r.url)).toEqual(['/https', '/name']);
  });

  it('follows up to 3 redirects and refuses the 4th', async () => {
    const srv = await startServer((req, res) => {
      const m = /^\/(\d+)\/hop\/(\d+)$/.exec(req.url);
      const total = Number(m![1]);
      const n = Number(m![2]);
      if (n < total) {
        res.writeHead(302, { location: `/${total}/hop/${n + 1}` });
        return void res.end();
      }
      res.end(`arrived after ${n}`);
    });
    const c = client();
    expect((await c.request(`${srv.url}/3/hop/0`)).text).toBe('arrived after 3');
    expect(srv.requests).toHaveLength(4);
    srv.requests.length = 0;
    const err = await expectCode(c.request(`${srv.url}/4/hop/0`), 'redirect_refused');
    expect(err.message).toMatch(/too many redirects/);
    // The 4th redirect is never followed.
    expect(srv.requests.map((r) => r.url)).toEqual(['/4/hop/0', '/4/hop/1', '/4/hop/2', '/4/hop/3']);
  });

  it('returns a 3xx without a location (and a 304) as is', async () => {
    const srv = await startServer((req, res) => {
      res.writeHead(req.url === '/304' ? 304 : 300, req.url === '/304' ? { location: '/elsewhere' } : {});
      res.end();
    });
    expect((await client().request(`${srv.url}/300`)).status).toBe(300);
    expect((await client().request(`${srv.url}/304`)).status).toBe(304);
    expect(srv.requests).toHaveLength(2);
  });
});

describe('destination policy (allowPrivateNetworks false)', () => {
  const strict = () => client({ allowPrivateNetworks: false, timeoutMs: 2000 });

  it('refuses plain http, before any connection', async () => {
    const srv = await startServer((_req, res) => res.end());
    const err = await expectCode(strict().request(`${srv.url}/x`), 'insecure_url');
    expect(err.retryable).toBe(false);
    await expectCode(strict().request('http://example.com/'), 'insecure_url');
    expect(srv.connections).toBe(0);
  });

  it('refuses private IP literals over https', async () => {
    const c = strict();
    for (const url of [
      'https://127.0.0.1/',
      'https://10.0.0.1/',
      'https://192.168.1.1/',
      'https://169.254.169.254/latest/meta-data',
      'https://[::1]/',
      'https://[::ffff:127.0.0.1]/',
      'https://[fe80::1]/',
      'https://0.0.0.0/',
    ]) {
      const err = await expectCode(c.request(url), 'address_refused');
      expect(err.retryable).toBe(false);
      expect(err.message).not.toContain('meta-data');
    }
  });

  it('refuses https://localhost:<port>/ at DNS time: no connection is made', async () => {
    const srv = await startServer((_req, res) => res.end());
    const err = await expectCode(strict().request(`https://localhost:${srv.port}/`), 'address_refused');
    expect(err.message).toContain('localhost');
    expect(srv.connections).toBe(0);
    expect(srv.requests).toHaveLength(0);
  });

  it('refuses credentials in the URL and strings that are not URLs', async () => {
    await expectCode(client().request('https://user:pass@example.com/'), 'bad_url');
    await expectCode(client().request('not a url'), 'bad_url');
    await expectCode(client().request('ftp://example.com/'), 'insecure_url');
  });

  it('allowPrivateNetworks true lets loopback and plain http through', async () => {
    const srv = await startServer((_req, res) => res.end('hi'));
    expect((await client({ allowPrivateNetworks: true }).request(`http://localhost:${srv.port}/`)).text).toBe('hi');
  });
});

describe('addressAllowed', () => {
  it.each([
    '10.1.2.3',
    '172.16.0.1',
    '172.31.255.255',
    '192.168.0.1',
    '169.254.169.254',
    '100.64.0.1',
    '127.0.0.1',
    '0.0.0.0',
    '255.255.255.255',
    '224.0.0.1',
    '::1',
    '::',
    '::ffff:127.0.0.1',
    '::ffff:10.0.0.1',
    '::7f00:1',
    '::127.0.0.1',
    '::a9fe:a9fe',
    'fe80::1',
    'fc00::1',
    'fd12:3456::1',
    'not-an-ip',
    '',
  ])('%s is refused', (address) => {
    expect(addressAllowed(address, false)).toBe(false);
  });

  it.each(['8.8.8.8', '1.1.1.1', '172.32.0.1', '2606:4700:4700::1111', '::ffff:8.8.8.8'])('%s is allowed', (address) => {
    expect(addressAllowed(address, false)).toBe(true);
  });

  it('allows everything when private networks are allowed', () => {
    expect(addressAllowed('127.0.0.1', true)).toBe(true);
    expect(addressAllowed('10.0.0.1', true)).toBe(true);
  });
});

describe('failures', () => {
  it('a server that never answers → timeout, within roughly the configured timeout', async () => {
    const srv = await startServer(() => {
      /* never answers */
    });
    const started = performance.now();
    const err = await expectCode(client({ timeoutMs: 300 }).request(srv.url), 'timeout');
    const elapsed = performance.now() - started;
    expect(elapsed).toBeGreaterThanOrEqual(250);
    expect(elapsed).toBeLessThan(1500);
    expect(err.retryable).toBe(true);
    expect(srv.requests).toHaveLength(1);
  });

  it('a per-call timeoutMs overrides the client default', async () => {
    const srv = await startServer(() => {});
    const started = performance.now();
    await expectCode(client({ timeoutMs: 10_000 }).request(srv.url, { timeoutMs: 200 }), 'timeout');
    expect(performance.now() - started).toBeLessThan(1500);
  });

  it('a deadline cuts the timeout to what is left, and a call made after it is not sent at all', async () => {
    const srv = await startServer(() => {});
    const c = client({ timeoutMs: 10_000 });
    const started = performance.now();
    const err = await expectCode(c.request(srv.url, { deadline: Date.now() + 200 }), 'timeout');
    expect(performance.now() - started).toBeLessThan(1500);
    expect(err.retryable).toBe(true);
    expect(srv.requests).toHaveLength(1);
    // A later per-call timeout does not extend it either.
    await expectCode(c.request(srv.url, { deadline: Date.now() - 1, timeoutMs: 5000 }), 'timeout');
    expect(srv.requests).toHaveLength(1);
    expect(srv.connections).toBe(1);
  });

  it('a body that stalls after the headers → timeout', async () => {
    const srv = await startServer((_req, res) => {
      res.writeHead(200, { 'content-length': '100' });
      res.write('partial');
    });
    const started = performance.now();
    await expectCode(client({ timeoutMs: 300 }).request(srv.url), 'timeout');
    expect(performance.now() - started).toBeLessThan(1500);
  });

  it('a refused connection (closed port) → network, retryable', async () => {
    const port = await freePort();
    const err = await expectCode(client().request(`http://127.0.0.1:${port}/x`), 'network');
    expect(err.retryable).toBe(true);
    expect(err.message).toContain('127.0.0.1');
    expect(err.message).not.toContain('/x');
  });

  it('a name that does not resolve → network, retryable', async () => {
    const err = await expectCode(client().request('https://no-such-host.invalid/'), 'network');
    expect(err.retryable).toBe(true);
  });
});

describe('retryAfterMs', () => {
  const now = Date.parse('2026-03-01T12:00:00Z');

  it('parses delta seconds', () => {
    expect(retryAfterMs({ 'retry-after': '120' }, now)).toBe(120_000);
    expect(retryAfterMs({ 'retry-after': '0' }, now)).toBe(0);
    expect(retryAfterMs({ 'retry-after': ' 5 ' }, now)).toBe(5000);
  });

  it('parses an HTTP date relative to now, never negative', () => {
    expect(retryAfterMs({ 'retry-after': 'Sun, 01 Mar 2026 12:00:30 GMT' }, now)).toBe(30_000);
    expect(retryAfterMs({ 'retry-after': new Date(now + 90_000).toUTCString() }, now)).toBe(90_000);
    expect(retryAfterMs({ 'retry-after': 'Sun, 01 Mar 2026 11:00:00 GMT' }, now)).toBe(0);
  });

  it('is null when absent or unreadable', () => {
    expect(retryAfterMs({}, now)).toBeNull();
    expect(retryAfterMs({ 'retry-after': '' }, now)).toBeNull();
    expect(retryAfterMs({ 'retry-after': 'soon' }, now)).toBeNull();
    expect(retryAfterMs({ 'retry-after': '5 minutes' }, now)).toBeNull();
  });

  // BUG (src/lib/outbound.ts:186-187): values that are neither delay-seconds nor an HTTP date fall through to
  // Date.parse, which V8 reads leniently ('-5' as the year -5, '1.5' as 5 January 2001), so they come back as 0 ms
  // ("retry now") instead of null (fall back to the backoff).
  it('is null for numbers that are not delay-seconds (negative, fractional)', () => {
    expect(retryAfterMs({ 'retry-after': '-5' }, now)).toBeNull();
    expect(retryAfterMs({ 'retry-after': '1.5' }, now)).toBeNull();
  });
});

describe('MemoryCache', () => {
  it('returns a value until its ttl passes, then forgets it', () => {
    let t = 1_000_000;
    const cache = new MemoryCache(10, () => t);
    cache.set('k', { token: 'abc' }, 1000);
    expect(cache.get('k')).toEqual({ token: 'abc' });
    t += 999;
    expect(cache.get('k')).toEqual({ token: 'abc' });
    t += 1;
    expect(cache.get('k')).toBeUndefined();
    t -= 500; // expired entries are dropped, not just hidden
    expect(cache.get('k')).toBeUndefined();
  });

  it('set replaces a value and its ttl; delete removes it', () => {
    let t = 0;
    const cache = new MemoryCache(10, () => t);
    cache.set('k', 1, 100);
    cache.set('k', 2, 1000);
    t = 500;
    expect(cache.get('k')).toBe(2);
    cache.delete('k');
    expect(cache.get('k')).toBeUndefined();
    cache.delete('never-set');
    expect(cache.get('missing')).toBeUndefined();
  });

  it('is bounded: when full, the oldest entry goes', () => {
    const cache = new MemoryCache(3, () => 0);
    cache.set('a', 'A', 1000);
    cache.set('b', 'B', 1000);
    cache.set('c', 'C', 1000);
    cache.set('d', 'D', 1000);
    expect(cache.get('a')).toBeUndefined();
    expect([cache.get('b'), cache.get('c'), cache.get('d')]).toEqual(['B', 'C', 'D']);
    // Re-setting a key makes it the newest, so the next eviction takes the next oldest.
    cache.set('b', 'B2', 1000);
    cache.set('e', 'E', 1000);
    expect(cache.get('c')).toBeUndefined();
    expect([cache.get('b'), cache.get('d'), cache.get('e')]).toEqual(['B2', 'D', 'E']);
  });
});

describe('the fetch-based client (Workers) follows the same policy', () => {
  const fetchClient = (overrides: Partial<OutboundOptions> = {}) =>
    createFetchHttpClient({ allowPrivateNetworks: true, timeoutMs: 2000, maxResponseBytes: 1024, ...overrides });

  it('sends the user agent and a JSON body, and follows a same-origin redirect itself', async () => {
    const srv = await startServer((req, res) => {
      if (req.url === '/old') {
        res.writeHead(307, { location: '/new' });
        return void res.end();
      }
      res.end('landed');
    });
    const res = await fetchClient().request(`${srv.url}/old`, { method: 'PUT', json: { a: 1 } });
    expect(res).toMatchObject({ status: 200, text: 'landed' });
    expect(srv.requests.map((r) => `${r.method} ${r.url} ${r.body}`)).toEqual(['PUT /old {"a":1}', 'PUT /new {"a":1}']);
    expect(srv.requests[0]!.headers['user-agent']).toBe(USER_AGENT);
  });

  it('re-sends a PUT with its body on a 302, and refuses a 303 to it', async () => {
    const srv = await startServer((req, res) => {
      if (req.url === '/302' || req.url === '/303') {
        res.writeHead(Number(req.url.slice(1)), { location: '/new' });
        return void res.end();
      }
      res.end('landed');
    });
    expect((await fetchClient().request(`${srv.url}/302`, { method: 'PUT', json: { a: 1 } })).text).toBe('landed');
    await expectCode(fetchClient().request(`${srv.url}/303`, { method: 'PUT', json: { a: 1 } }), 'redirect_refused');
    expect(srv.requests.map((r) => `${r.method} ${r.url} ${r.body}`)).toEqual(['PUT /302 {"a":1}', 'PUT /new {"a":1}', 'PUT /303 {"a":1}']);
  });

  it('refuses a cross-origin redirect, an oversized response, plain http and private literals', async () => {
    const other = await startServer((_req, res) => res.end('should not be reached'));
    const srv = await startServer((req, res) => {
      if (req.url === '/away') {
        res.writeHead(302, { location: `${other.url}/steal` });
        return void res.end();
      }
      if (req.url === '/big') return void res.end('x'.repeat(2000));
      res.write('y'.repeat(800));
      res.end('y'.repeat(800));
    });
    await expectCode(fetchClient().request(`${srv.url}/away`), 'redirect_refused');
    expect(other.requests).toHaveLength(0);
    await expectCode(fetchClient().request(`${srv.url}/big`), 'response_too_large');
    await expectCode(fetchClient().request(`${srv.url}/chunked`), 'response_too_large');
    await expectCode(fetchClient({ allowPrivateNetworks: false }).request(`${srv.url}/x`), 'insecure_url');
    await expectCode(fetchClient({ allowPrivateNetworks: false }).request('https://10.0.0.1/x'), 'address_refused');
  });
});
