import http from 'node:http';
import type { AddressInfo } from 'node:net';

export interface RecordedCall {
  method: string;
  path: string;
  /** The query string's parameters (routes match on the path alone). */
  query: URLSearchParams;
  /** Lower-case header names. */
  headers: Record<string, string>;
  body: string;
  json: unknown;
}

export interface FakeReply {
  status: number;
  body?: unknown;
  headers?: Record<string, string>;
  /** Wait this long before answering (to provoke timeouts). */
  delayMs?: number;
}

export type FakeHandler = (call: RecordedCall, fake: FakeVendor) => FakeReply | Promise<FakeReply>;

/**
 * A real HTTP server on loopback standing in for a vendor API. Routes are `METHOD /path` (exact path, query
 * ignored) or a function; every call is recorded; unknown routes answer 404.
 */
export class FakeVendor {
  readonly calls: RecordedCall[] = [];
  private routes = new Map<string, FakeHandler>();
  private server: http.Server;
  url = '';

  constructor() {
    this.server = http.createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        const body = Buffer.concat(chunks).toString('utf8');
        let json: unknown;
        try {
          json = body ? JSON.parse(body) : undefined;
        } catch {
          json = undefined;
        }
        const headers: Record<string, string> = {};
        for (const [k, v] of Object.entries(req.headers)) if (typeof v === 'string') headers[k] = v;
        const [path = '/', search = ''] = (req.url ?? '/').split('?', 2);
        const call: RecordedCall = { method: req.method ?? 'GET', path, query: new URLSearchParams(search), headers, body, json };
        this.calls.push(call);
        const handler = this.routes.get(`${call.method} ${path}`) ?? this.fallback;
        void Promise.resolve(handler(call, this)).then(
          async (reply) => {
            if (reply.delayMs) await new Promise((r) => setTimeout(r, reply.delayMs));
            if (res.destroyed) return;
            const payload =
              reply.body === undefined ? '' : typeof reply.body === 'string' ? reply.body : JSON.stringify(reply.body);
            res.writeHead(reply.status, {
              ...(typeof reply.body === 'object' ? { 'content-type': 'application/json' } : {}),
              ...reply.headers,
            });
            res.end(payload);
          },
          () => {
            res.writeHead(500);
            res.end();
          },
        );
      });
    });
  }

  private fallback: FakeHandler = () => ({ status: 404, body: { error: 'no such route in the fake' } });

  /** Answer `METHOD /path` with a fixed reply or a handler (replaces an earlier one). */
  on(route: string, reply: FakeReply | FakeHandler): this {
    this.routes.set(route, typeof reply === 'function' ? reply : () => reply);
    return this;
  }

  callsTo(route: string): RecordedCall[] {
    const [method, path] = route.split(' ');
    return this.calls.filter((c) => c.method === method && c.path === path);
  }

  async start(): Promise<this> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', () => resolve()));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
    return this;
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

/** Fails the first `n` calls with `failure`, then answers `ok`: a vendor that is down for a while. */
export function failFirst(n: number, failure: FakeReply, ok: FakeReply): FakeHandler {
  let seen = 0;
  return () => (++seen <= n ? failure : ok);
}
