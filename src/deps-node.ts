import { getConnInfo } from '@hono/node-server/conninfo';
import type { Context } from 'hono';
import { outboundSettings } from './config.ts';
import { createDeps, type NodeDepsOptions } from './deps.ts';
import type { AppDeps } from './http/env.ts';
import { createHttpClient } from './lib/outbound-node.ts';

/** createDeps with the undici outbound client (Node: the server, the CLI, tests and benchmarks). */
export function createNodeDeps(opts: NodeDepsOptions): AppDeps {
  return createDeps({ remoteAddress: socketAddress, ...opts, http: createHttpClient(outboundSettings(opts.env)) });
}

/** The peer of the TCP connection under @hono/node-server; undefined for in-process requests (tests). */
function socketAddress(c: Context): string | undefined {
  try {
    return getConnInfo(c).remote.address;
  } catch {
    return undefined;
  }
}
