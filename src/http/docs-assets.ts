import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';

/** swagger-ui-dist files read from node_modules (Node runtime). */
export async function readDocsAsset(file: string): Promise<Uint8Array<ArrayBuffer> | null> {
  const dir = path.dirname(createRequire(import.meta.url).resolve('swagger-ui-dist/package.json'));
  return readFile(path.join(dir, path.basename(file))).catch(() => null);
}
