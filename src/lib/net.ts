import { readFileSync } from 'node:fs';
import net from 'node:net';

/**
 * The kernel's range for ephemeral ports (Linux; elsewhere the common default). Outgoing connections and listeners on
 * port 0 take their ports from it, so a port found free there can be taken by one of them before it is used.
 */
export function ephemeralPortRange(): [number, number] {
  try {
    const [low, high] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
    if (low && high && low <= high) return [low, high];
  } catch {
    // not Linux
  }
  return [32768, 60999];
}

const FIRST_CHOSEN_PORT = 20000;

function listenable(port: number): Promise<number | undefined> {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.once('error', () => resolve(undefined));
    srv.listen(port, '127.0.0.1', () => {
      const { port: bound } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(bound));
    });
  });
}

/**
 * A loopback port nothing listens on right now, for throwaway servers in tests and benchmarks. It is drawn at random
 * below the ephemeral range (see ephemeralPortRange), so that only another such draw can take it before the caller
 * binds it; when that range leaves no room, the kernel picks one.
 */
export async function freePort(): Promise<number> {
  const [ephemeralLow] = ephemeralPortRange();
  const high = Math.min(ephemeralLow, 65536);
  if (high - FIRST_CHOSEN_PORT >= 1000) {
    const port = await freePortIn(FIRST_CHOSEN_PORT, high);
    if (port !== undefined) return port;
  }
  const port = await listenable(0);
  if (port === undefined) throw new Error('no free loopback port');
  return port;
}

/** A port in [low, high) that could be bound just now, from up to 50 random draws; undefined if none was. */
export async function freePortIn(low: number, high: number): Promise<number | undefined> {
  for (let i = 0; i < 50; i++) {
    const port = await listenable(low + Math.floor(Math.random() * (high - low)));
    if (port !== undefined) return port;
  }
  return undefined;
}

/**
 * The base URL a person can open for a server listening on `host`: a wildcard address becomes `localhost`, and an
 * IPv6 address is bracketed (`http://[::1]:3000`, not `http://::1:3000`).
 */
export function localBaseUrl(host: string, port: number): string {
  const shown = host === '0.0.0.0' || host === '::' ? 'localhost' : net.isIPv6(host) ? `[${host}]` : host;
  return `http://${shown}:${port}`;
}
