import dns from 'node:dns';
import { Agent, request } from 'undici';
import { addressAllowed, policyClient, readCapped, type HttpClient, type OutboundOptions } from './outbound.ts';

/** The outbound client for Node: one undici Agent (keep-alive pool) behind the shared policy. */
export function createHttpClient(opts: OutboundOptions): HttpClient {
  // DNS answers are checked at connect time, so a name that resolves to an internal address is refused even if it
  // looked public when the URL was validated (and a rebinding between the two cannot slip through).
  const guardedLookup = ((
    hostname: string,
    options: dns.LookupOptions,
    callback: (err: NodeJS.ErrnoException | null, address: string | dns.LookupAddress[], family?: number) => void,
  ) => {
    dns.lookup(hostname, { ...options, all: true }, (err, addresses) => {
      if (err) return callback(err, []);
      if (addresses.some((a) => !addressAllowed(a.address, opts.allowPrivateNetworks))) {
        const refused = new Error(`refused: ${hostname} resolves to a non-public address`) as NodeJS.ErrnoException;
        refused.code = 'EADDRREFUSED_BY_POLICY';
        return callback(refused, []);
      }
      if (options.all) return callback(null, addresses);
      const first = addresses[0];
      if (!first) return callback(Object.assign(new Error('no address'), { code: 'ENOTFOUND' }), []);
      callback(null, first.address, first.family);
    });
  }) as typeof dns.lookup;

  const agent = new Agent({
    connect: { timeout: opts.connectTimeoutMs ?? Math.min(5_000, opts.timeoutMs), lookup: guardedLookup },
    headersTimeout: opts.timeoutMs,
    bodyTimeout: opts.timeoutMs,
    keepAliveTimeout: 10_000,
  });

  return policyClient(
    opts,
    async (url, init) => {
      const res = await request(url, {
        dispatcher: agent,
        method: init.method as 'GET',
        headers: init.headers,
        body: init.body,
        signal: init.signal,
      });
      const headers: Record<string, string> = {};
      for (const [k, v] of Object.entries(res.headers)) {
        if (v !== undefined) headers[k.toLowerCase()] = Array.isArray(v) ? v.join(', ') : v;
      }
      const text = await readCapped(res.body, headers['content-length'], url, opts.maxResponseBytes, () => {
        // Destroying an unread body makes undici emit an abort error; nobody else listens, so swallow it here
        // (an unhandled 'error' event would take the process down).
        res.body.on('error', () => {});
        res.body.destroy();
      });
      return { status: res.statusCode, headers, text };
    },
    () => agent.close(),
  );
}
