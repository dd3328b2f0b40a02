import { policyClient, readCapped, type HttpClient, type OutboundOptions } from './outbound.ts';

/**
 * The outbound client on Cloudflare Workers, where undici cannot run: the platform's fetch behind the same policy.
 * Workers cannot reach private networks anyway; names are resolved by the platform, so only IP literals are judged.
 */
export function createFetchHttpClient(opts: OutboundOptions): HttpClient {
  return policyClient(
    opts,
    async (url, init) => {
      const res = await fetch(url, { method: init.method, headers: init.headers, body: init.body, signal: init.signal, redirect: 'manual' });
      const headers: Record<string, string> = {};
      res.headers.forEach((v, k) => (headers[k.toLowerCase()] = v));
      const body = res.body ?? (async function* () {})();
      const text = await readCapped(
        body as AsyncIterable<Uint8Array>,
        res.headers.get('content-length'),
        url,
        opts.maxResponseBytes,
        // Refused before reading: cancel the body. Refused mid-read: leaving the for-await cancels it already, and
        // cancelling a locked stream would only reject.
        () => {
          if (res.body && !res.body.locked) res.body.cancel().catch(() => {});
        },
      );
      return { status: res.status, headers, text };
    },
    async () => {},
  );
}
