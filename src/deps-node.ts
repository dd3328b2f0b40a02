import { outboundSettings } from './config.ts';
import { createDeps, type NodeDepsOptions } from './deps.ts';
import type { AppDeps } from './http/env.ts';
import { createHttpClient } from './lib/outbound-node.ts';

/** createDeps with the undici outbound client (Node: the server, the CLI, tests and benchmarks). */
export function createNodeDeps(opts: NodeDepsOptions): AppDeps {
  return createDeps({ ...opts, http: createHttpClient(outboundSettings(opts.env)) });
}
