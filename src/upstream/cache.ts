import type { ConnectorCache } from '../../connectors/types.ts';

/**
 * Per-process memo for signing keys and access tokens. Bounded: the oldest entry goes when full. Losing an entry
 * only costs a refetch, so nothing here needs to survive a restart or be shared between processes.
 */
export class MemoryCache implements ConnectorCache {
  private entries = new Map<string, { value: unknown; expiresAt: number }>();

  constructor(
    private readonly maxEntries = 1_000,
    private readonly clock: () => number = Date.now,
  ) {}

  get<T>(key: string): T | undefined {
    const hit = this.entries.get(key);
    if (!hit) return undefined;
    if (hit.expiresAt <= this.clock()) {
      this.entries.delete(key);
      return undefined;
    }
    return hit.value as T;
  }

  set<T>(key: string, value: T, ttlMs: number): void {
    this.entries.delete(key);
    if (this.entries.size >= this.maxEntries) this.entries.delete(this.entries.keys().next().value!);
    this.entries.set(key, { value, expiresAt: this.clock() + ttlMs });
  }

  delete(key: string): void {
    this.entries.delete(key);
  }
}
