import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { ephemeralPortRange, freePort, freePortIn, localBaseUrl } from '../../src/lib/net.ts';

function listen(port: number): Promise<net.Server | undefined> {
  const srv = net.createServer();
  return new Promise((resolve) => {
    srv.once('error', () => resolve(undefined));
    srv.listen(port, '127.0.0.1', () => resolve(srv));
  });
}

describe('freePort', () => {
  it('gives a port below the ephemeral range (where outgoing connections cannot take it) that a server can bind', async () => {
    const [low, high] = ephemeralPortRange();
    expect(low).toBeGreaterThan(1024);
    expect(high).toBeGreaterThanOrEqual(low);
    // freePort draws below the range only when at least 1,000 ports lie between 20000 and it; else the kernel picks.
    const drawsBelow = low - 20000 >= 1000;
    for (let i = 0; i < 20; i++) {
      const port = await freePort();
      if (drawsBelow) {
        expect(port).toBeGreaterThanOrEqual(20000);
        expect(port).toBeLessThan(low);
      }
      const srv = await listen(port);
      expect(srv, `port ${port} could not be bound`).toBeDefined();
      await new Promise((resolve) => srv!.close(resolve));
    }
  });

  it('never gives a port something listens on', async () => {
    // A small range with every other port held: half the draws hit a held port, and none of those may come back.
    const low = 24000 + Math.floor(Math.random() * 4000);
    const held: net.Server[] = [];
    const heldPorts = new Set<number>();
    for (let port = low; port < low + 40; port += 2) {
      const srv = await listen(port);
      if (!srv) continue; // taken by something else: as good as held
      held.push(srv);
      heldPorts.add(port);
    }
    expect(heldPorts.size).toBeGreaterThan(10);
    try {
      for (let i = 0; i < 50; i++) {
        const port = await freePortIn(low, low + 40);
        expect(port).toBeDefined();
        expect(port).toBeGreaterThanOrEqual(low);
        expect(port).toBeLessThan(low + 40);
        expect(heldPorts.has(port!)).toBe(false);
      }
    } finally {
      await Promise.all(held.map((s) => new Promise((resolve) => s.close(resolve))));
    }
  });
});

describe('localBaseUrl (the URLs the start-up banner prints)', () => {
  it('brackets an IPv6 address and shows a wildcard address as localhost', () => {
    expect(localBaseUrl('127.0.0.1', 3000)).toBe('http://127.0.0.1:3000');
    expect(localBaseUrl('0.0.0.0', 3000)).toBe('http://localhost:3000');
    expect(localBaseUrl('::', 3000)).toBe('http://localhost:3000');
    expect(localBaseUrl('::1', 3000)).toBe('http://[::1]:3000');
    expect(localBaseUrl('fe80::1', 8080)).toBe('http://[fe80::1]:8080');
    expect(localBaseUrl('app.internal', 80)).toBe('http://app.internal:80');
    expect(() => new URL(`${localBaseUrl('::1', 3000)}/healthz`)).not.toThrow();
  });
});
