import { isIP } from 'node:net';
import ipaddr from 'ipaddr.js';
import pkg from '../../package.json' with { type: 'json' };

export const USER_AGENT = `dsr-connector/${pkg.version}`;

export interface OutboundRequest {
  method?: 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';
  headers?: Record<string, string>;
  /** JSON body (sets content-type). */
  json?: unknown;
  /** Form body, application/x-www-form-urlencoded. */
  form?: Record<string, string>;
  /** Overrides the client's total timeout for this call. */
  timeoutMs?: number;
  /**
   * The call must be over by this moment (Date.now() milliseconds): its timeout is cut to what is left, and a call
   * made after it fails at once with a timeout.
   */
  deadline?: number;
}

export interface OutboundResponse {
  status: number;
  /** Lower-case header names. */
  headers: Record<string, string>;
  text: string;
}

/** The one outbound HTTP client: every call to a vendor goes through it. */
export interface HttpClient {
  request(url: string | URL, init?: OutboundRequest): Promise<OutboundResponse>;
  close(): Promise<void>;
}

export type OutboundErrorCode =
  | 'timeout'
  | 'network'
  | 'response_too_large'
  | 'redirect_refused'
  | 'address_refused'
  | 'insecure_url'
  | 'bad_url';

/** A call that got no usable response. Messages name the host at most, never a path, query or body. */
export class OutboundError extends Error {
  override name = 'OutboundError';
  constructor(
    readonly code: OutboundErrorCode,
    message: string,
  ) {
    super(message);
  }
  /** Worth trying again later: the network or the peer may recover; a refused address or URL will not. */
  get retryable(): boolean {
    return this.code === 'timeout' || this.code === 'network';
  }
}

export interface OutboundOptions {
  /** Allow private, loopback and link-local destinations, and plain http (tests, local development). */
  allowPrivateNetworks: boolean;
  timeoutMs: number;
  connectTimeoutMs?: number;
  maxResponseBytes: number;
}

const MAX_REDIRECTS = 3;

/** IPv4-compatible IPv6 (::a.b.c.d, deprecated by RFC 4291): a stack that still honours it reaches the IPv4 host. */
const IPV4_COMPATIBLE = ipaddr.parseCIDR('::/96');

/** Public unicast addresses only, unless private networks are allowed. IPv4-mapped IPv6 is judged as IPv4. */
export function addressAllowed(address: string, allowPrivateNetworks: boolean): boolean {
  if (allowPrivateNetworks) return true;
  if (!ipaddr.isValid(address)) return false;
  const parsed = ipaddr.process(address);
  if (parsed.kind() === 'ipv6' && parsed.match(IPV4_COMPATIBLE)) return false;
  return parsed.range() === 'unicast';
}

/** One request/response exchange without redirects; the runtime decides how (undici in Node, fetch on Workers). */
export type SendOnce = (
  url: URL,
  init: { method: string; headers: Record<string, string>; body?: string; signal: AbortSignal },
) => Promise<OutboundResponse>;

/**
 * The policy every outbound call follows, whatever sends the bytes: https only (unless private networks are
 * allowed), no credentials in URLs, no private IP literals, a total timeout, and redirects followed only within the
 * same origin (credentials and nonces travel in headers and must never reach another host) and only with the same
 * method and body (a 303 to anything but a GET is refused).
 */
export function policyClient(
  opts: OutboundOptions,
  send: SendOnce,
  close: () => Promise<void>,
): HttpClient {
  function checkUrl(url: URL): void {
    if (url.protocol !== 'https:' && !(url.protocol === 'http:' && opts.allowPrivateNetworks)) {
      throw new OutboundError('insecure_url', `refused: only https URLs may be called (host ${url.hostname})`);
    }
    if (url.username || url.password) throw new OutboundError('bad_url', 'refused: credentials in a URL');
    const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
    // An IP literal never reaches a DNS lookup: judge it here.
    if (isIP(host) && !addressAllowed(host, opts.allowPrivateNetworks)) {
      throw new OutboundError('address_refused', `refused: ${host} is not a public address`);
    }
  }

  return {
    async request(target, init = {}) {
      let url: URL;
      try {
        url = new URL(target);
      } catch {
        throw new OutboundError('bad_url', 'refused: not a valid URL');
      }
      const timeoutMs = Math.min(init.timeoutMs ?? opts.timeoutMs, (init.deadline ?? Infinity) - Date.now());
      if (!(timeoutMs > 0)) throw new OutboundError('timeout', `timed out calling ${url.hostname}`);
      const signal = AbortSignal.timeout(timeoutMs);
      const headers: Record<string, string> = { 'user-agent': USER_AGENT, accept: 'application/json', ...init.headers };
      let body: string | undefined;
      if (init.json !== undefined) {
        body = JSON.stringify(init.json);
        headers['content-type'] ??= 'application/json';
      } else if (init.form) {
        body = new URLSearchParams(init.form).toString();
        headers['content-type'] ??= 'application/x-www-form-urlencoded';
      }
      const method: string = init.method ?? 'GET';
      try {
        for (let hop = 0; ; hop++) {
          checkUrl(url);
          const res = await send(url, { method, headers, body, signal });
          const location = res.headers.location;
          if (res.status < 300 || res.status >= 400 || res.status === 304 || !location) return res;
          const next = new URL(location, url);
          if (next.origin !== url.origin) {
            throw new OutboundError('redirect_refused', `refused: redirect from ${url.hostname} to another host`);
          }
          if (hop + 1 > MAX_REDIRECTS) throw new OutboundError('redirect_refused', `too many redirects from ${url.hostname}`);
          // Every call that is not a GET carries a report (or a token request): its body is the point. A redirect is
          // followed with the same method and body (307, 308, and 301/302 too, which RFC 9110 allows: only browsers'
          // habit turns a POST into a GET there). A 303 says the answer is a page to GET elsewhere: the vendor did not
          // say it took the report, and a GET's 2xx must not pass for its delivery, so it is refused.
          if (res.status === 303 && method !== 'GET') {
            throw new OutboundError('redirect_refused', `refused: HTTP 303 from ${url.hostname} to a ${method} (it would become a GET without its body)`);
          }
          url = next;
        }
      } catch (err) {
        throw toOutboundError(err, url);
      }
    },
    close,
  };
}

/** Reads a body stream, refusing it once it passes the cap (a vendor must not be able to exhaust our memory). */
export async function readCapped(
  chunks: AsyncIterable<Uint8Array>,
  declaredLength: string | null | undefined,
  url: URL,
  maxBytes: number,
  abort: () => void,
): Promise<string> {
  const tooLarge = () => new OutboundError('response_too_large', `response from ${url.hostname} exceeds ${maxBytes} bytes`);
  if (Number(declaredLength ?? NaN) > maxBytes) {
    abort();
    throw tooLarge();
  }
  const parts: Uint8Array[] = [];
  let size = 0;
  for await (const chunk of chunks) {
    size += chunk.byteLength;
    if (size > maxBytes) {
      abort();
      throw tooLarge();
    }
    parts.push(chunk);
  }
  return Buffer.concat(parts).toString('utf8');
}

function toOutboundError(err: unknown, url: URL): OutboundError {
  if (err instanceof OutboundError) return err;
  const e = err as { name?: string; code?: string; cause?: { code?: string } };
  const code = e.code ?? e.cause?.code;
  if (code === 'EADDRREFUSED_BY_POLICY') {
    return new OutboundError('address_refused', `refused: ${url.hostname} resolves to a non-public address`);
  }
  if (e.name === 'TimeoutError' || e.name === 'AbortError' || /TIMEOUT/.test(code ?? '')) {
    return new OutboundError('timeout', `timed out calling ${url.hostname}`);
  }
  return new OutboundError('network', `network error calling ${url.hostname}${code ? ` (${code})` : ''}`);
}

/** Delay a peer asked for in `Retry-After` (seconds or an HTTP date), in milliseconds; null if absent or invalid. */
export function retryAfterMs(headers: Record<string, string>, now = Date.now()): number | null {
  const v = headers['retry-after']?.trim();
  if (!v) return null;
  if (/^\d+$/.test(v)) return Number(v) * 1000;
  // Only an HTTP-date (e.g. "Wed, 21 Oct 2026 07:28:00 GMT"); Date.parse alone reads "-5" or "1.5" as dates.
  if (!/^[A-Za-z]{3}, \d{2} [A-Za-z]{3} \d{4} \d{2}:\d{2}:\d{2} GMT$/.test(v)) return null;
  const at = Date.parse(v);
  return Number.isNaN(at) ? null : Math.max(0, at - now);
}
