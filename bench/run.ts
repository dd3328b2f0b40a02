/**
 * Benchmark entry: `npm run bench -- [name…]`. With no name every benchmark runs (today: erase).
 *
 * Every benchmark receives a cleanup registry: whatever it creates (databases, an embedded PostgreSQL, temp dirs) is
 * registered there right away, and the registry is drained on normal exit, on error, and on Ctrl-C / SIGTERM.
 */
import { runEraseBench } from './erase.ts';

type CleanupFn = () => Promise<void> | void;

/** LIFO cleanup stack; each step runs once, and a failing step does not stop the others. */
export class Cleanup {
  private steps: { label: string; fn: CleanupFn }[] = [];
  private draining: Promise<void> | undefined;

  /** Registers a step; the returned function runs it now (once) and unregisters it. */
  add(label: string, fn: CleanupFn): () => Promise<void> {
    const step = { label, fn };
    this.steps.push(step);
    return async () => {
      const i = this.steps.indexOf(step);
      if (i < 0) return;
      this.steps.splice(i, 1);
      await step.fn();
    };
  }

  runAll(): Promise<void> {
    this.draining ??= (async () => {
      for (let step = this.steps.pop(); step; step = this.steps.pop()) {
        try {
          await step.fn();
        } catch (err) {
          console.error(`cleanup: ${step.label} failed: ${(err as Error).message}`);
        }
      }
      this.draining = undefined;
    })();
    return this.draining;
  }
}

export interface BenchContext {
  cleanup: Cleanup;
  /** True once Ctrl-C / SIGTERM arrived: stop starting new work. */
  interrupted(): boolean;
}

const BENCHMARKS: Record<string, (ctx: BenchContext) => Promise<void>> = {
  erase: runEraseBench,
};

function usage(): string {
  return [
    'usage: npm run bench -- [benchmark…]',
    `benchmarks: ${Object.keys(BENCHMARKS).join(', ')} (default: all)`,
    'environment: DATABASE_URL (use that server instead of a throwaway embedded PostgreSQL),',
    '             BENCH_USER_ROUNDS, BENCH_WORKSPACE_ROUNDS (rounds per scenario; default 7 and 5),',
    '             BENCH_SCALE (data volume multiplier for quick trial runs; default 1)',
  ].join('\n');
}

async function main(argv: string[]): Promise<number> {
  if (argv.includes('-h') || argv.includes('--help')) {
    console.log(usage());
    return 0;
  }
  const unknown = argv.filter((a) => !Object.hasOwn(BENCHMARKS, a));
  if (unknown.length > 0) {
    console.error(`unknown benchmark: ${unknown.join(', ')}\n${usage()}`);
    return 2;
  }
  const names = argv.length > 0 ? [...new Set(argv)] : Object.keys(BENCHMARKS);

  const cleanup = new Cleanup();
  let interrupted = false;
  let firstSignalAt = 0;
  const onSignal = (signal: NodeJS.Signals) => {
    if (interrupted) {
      // tsx relays the terminal's Ctrl-C to us, so one keypress arrives twice: only a later one means "give up".
      if (performance.now() - firstSignalAt < 2_000) return;
      console.error(`\n${signal} again: exiting without finishing cleanup`);
      process.exit(130);
    }
    interrupted = true;
    firstSignalAt = performance.now();
    console.error(`\n${signal}: stopping and cleaning up…`);
    void cleanup.runAll().finally(() => process.exit(signal === 'SIGINT' ? 130 : 143));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  const ctx: BenchContext = { cleanup, interrupted: () => interrupted };
  const started = performance.now();
  try {
    for (const name of names) {
      if (interrupted) break;
      await BENCHMARKS[name]!(ctx);
    }
    return 0;
  } catch (err) {
    if (interrupted) return 130;
    console.error('benchmark failed:', err);
    return 1;
  } finally {
    await cleanup.runAll();
    if (!interrupted) console.log(`\ntotal bench time: ${((performance.now() - started) / 1000).toFixed(1)} s`);
  }
}

process.exitCode = await main(process.argv.slice(2));
