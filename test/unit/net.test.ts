import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { ephemeralPortRange, freePort } from '../../src/lib/net.ts';

describe('freePort', () => {
  it('gives a port below the ephemeral range (where outgoing connections cannot take it) that a server can bind', async () => {
    const [low, high] = ephemeralPortRange();
    expect(low).toBeGreaterThan(1024);
    expect(high).toBeGreaterThanOrEqual(low);
    for (let i = 0; i < 20; i++) {
      const port = await freePort();
      expect(port).toBeGreaterThanOrEqual(20000);
      expect(port).toBeLessThan(low);
      const srv = net.createServer();
      await new Promise<void>((resolve, reject) => {
        srv.once('error', reject);
        srv.listen(port, '127.0.0.1', resolve);
      });
      await new Promise((resolve) => srv.close(resolve));
    }
  });

  it('never gives a port something listens on', async () => {
    // Hold half the ports it draws from, so most draws hit a held one: none of them may come back.
    const [low] = ephemeralPortRange();
    const held: net.Server[] = [];
    const heldPorts = new Set<number>();
    for (let port = 20000; port < low; port += 2) {
      const srv = net.createServer();
      const ok = await new Promise<boolean>((resolve) => {
        srv.once('error', () => resolve(false));
        srv.listen(port, '127.0.0.1', () => resolve(true));
      });
      if (!ok) continue;
      held.push(srv);
      heldPorts.add(port);
    }
    expect(heldPorts.size).toBeGreaterThan((low - 20000) / 4);
    try {
      for (let i = 0; i < 50; i++) expect(heldPorts.has(await freePort())).toBe(false);
    } finally {
      await Promise.all(held.map((s) => new Promise((resolve) => s.close(resolve))));
    }
  });
});
