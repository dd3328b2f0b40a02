/**
 * Benchmark entry: `npm run bench -- [name…]`. With no name every benchmark runs: erase, intake, e2e, drain (memory
 * figures come from intake, erase and drain; `memory` runs intake and erase).
 *
 * Every benchmark receives a cleanup registry: whatever it creates (databases, processes, temp dirs) is registered
 * there right away, and the registry is drained when the benchmark ends (normally or not) and on Ctrl-C / SIGTERM.
 * The PostgreSQL server is shared by the whole run and goes last. Each benchmark returns its figures; one table of
 * all of them is printed at the end.
 */
import os from 'node:os';
import { runDrainBench } from './drain.ts';
import { runE2eBench } from './e2e.ts';
import { runEraseBench } from './erase.ts';
import { runIntakeBench } from './intake.ts';
import { loadAvg, machineCpu, machineShare, openServer, QUICK, type Figure, type Server } from './lib.ts';

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
  /** This benchmark's registry (drained when it ends); the run's own registry holds only the shared server. */
  cleanup: Cleanup;
  /** True once Ctrl-C / SIGTERM arrived: stop starting new work. */
  interrupted(): boolean;
  /** The run's PostgreSQL server (started before the first benchmark, shared by all, stopped at the very end). */
  server(): Promise<Server>;
}

type Bench = (ctx: BenchContext) => Promise<Figure[]>;

const BENCHMARKS: Record<string, Bench> = {
  erase: runEraseBench,
  intake: runIntakeBench,
  e2e: runE2eBench,
  drain: runDrainBench,
};
/** Names that stand for other benchmarks. */
const ALIASES: Record<string, string[]> = { memory: ['intake', 'erase'] };

function usage(): string {
  return [
    'usage: npm run bench -- [benchmark…]',
    `benchmarks: ${Object.keys(BENCHMARKS).join(', ')} (default: all); memory = intake + erase (their memory rows)`,
    'environment: DATABASE_URL (use that server instead of a throwaway embedded PostgreSQL)',
    '  BENCH_QUICK=1            every benchmark shrinks to a smoke run (~1 min in all; not the reference figures)',
    '  erase:  BENCH_USER_ROUNDS, BENCH_WORKSPACE_ROUNDS (default 7, 5), BENCH_SCALE (data volume; default 1)',
    '  intake: BENCH_INTAKE_ROUNDS (3), BENCH_INTAKE_SECONDS (10 per side per round), BENCH_INTAKE_CONNECTIONS (32)',
    '  e2e:    BENCH_E2E_ROUNDS (5), BENCH_E2E_WARMUP (3 discarded rounds first; 0 = none),',
    '          BENCH_E2E_TICKETS (20 per round), BENCH_E2E_EVENTS (1000 per user),',
    '          BENCH_E2E_DIAG_ROUNDS (2 rounds after, with wait sampling; not figures; 0 = none),',
    '          BENCH_E2E_WORKER_CONCURRENCY (experiments only; default the service default, 4)',
    '  drain:  BENCH_DRAIN_JOBS (5000), BENCH_DRAIN_EVENTS (10 per user), BENCH_DRAIN_ROUNDS (3)',
    '  BENCH_CPU_PROF_DIR=dir   every spawned process writes a V8 CPU profile there (diagnostics)',
  ].join('\n');
}

/** One markdown table of every figure of the run. */
function summary(figures: Figure[], failed: { name: string; error: string }[]): string {
  const cell = (s: string) => s.replaceAll('|', '\\|');
  const lines = [
    '| benchmark | what | result | baseline (same run) | ratio / target | pass/FAIL |',
    '|---|---|---:|---:|---:|:---:|',
    ...figures.map(
      (f) =>
        `| ${f.bench} | ${cell(f.what)} | ${cell(f.result)} | ${cell(f.baseline)} | ${cell(f.ratioOrTarget)} | ` +
        `${f.pass === null ? 'context' : f.pass ? 'pass' : '**FAIL**'} |`,
    ),
    ...failed.map((f) => `| ${f.name} | benchmark did not complete: ${cell(f.error)} | — | — | — | **FAIL** |`),
  ];
  return lines.join('\n');
}

async function main(argv: string[]): Promise<number> {
  if (argv.includes('-h') || argv.includes('--help')) {
    console.log(usage());
    return 0;
  }
  const unknown = argv.filter((a) => !Object.hasOwn(BENCHMARKS, a) && !Object.hasOwn(ALIASES, a));
  if (unknown.length > 0) {
    console.error(`unknown benchmark: ${unknown.join(', ')}\n${usage()}`);
    return 2;
  }
  const names =
    argv.length > 0 ? [...new Set(argv.flatMap((a) => ALIASES[a] ?? [a]))] : Object.keys(BENCHMARKS);

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

  let server: Promise<Server> | undefined;
  const root: BenchContext = {
    cleanup,
    interrupted: () => interrupted,
    server: () => (server ??= openServer(root)),
  };
  const started = performance.now();
  const machineAtStart = machineCpu();
  const figures: Figure[] = [];
  const failed: { name: string; error: string }[] = [];
  console.log(
    `dsr-connector benchmarks: ${names.join(', ')} — node ${process.version}, ${os.cpus().length} CPUs, ` +
      `load average ${loadAvg()} at start${QUICK ? ' — BENCH_QUICK=1: smoke run, not the reference figures' : ''}`,
  );
  try {
    // Started before any benchmark so that on Ctrl-C it is stopped after every benchmark's own cleanup.
    await root.server();
    for (const name of names) {
      if (interrupted) break;
      console.log(`\n${'='.repeat(100)}\n`);
      // A benchmark's processes and databases go as soon as it ends, so they cannot load the next one.
      const scope = new Cleanup();
      const drainScope = cleanup.add(`${name}: its resources`, () => scope.runAll());
      const machineBefore = machineCpu();
      try {
        figures.push(...(await BENCHMARKS[name]!({ ...root, cleanup: scope })));
      } catch (err) {
        if (interrupted) return 130;
        console.error(`\n${name} benchmark failed:`, err);
        failed.push({ name, error: (err as Error).message.split('\n')[0]!.slice(0, 200) });
      } finally {
        await drainScope();
        if (!interrupted) console.log(`${name}: the machine's CPU time during it: ${machineShare(machineBefore)}`);
      }
    }
    if (interrupted) return 130;
    console.log(
      `\n${'='.repeat(100)}\n\n## Summary (load average at end: ${loadAvg()}; the machine's CPU time over the run: ${machineShare(machineAtStart)})\n`,
    );
    console.log(summary(figures, failed));
    const missed = figures.filter((f) => f.pass === false).length;
    console.log(
      failed.length + missed === 0
        ? '\nEvery figure within its target.'
        : `\n${missed} figure(s) missed their target; ${failed.length} benchmark(s) did not complete.`,
    );
    return failed.length > 0 ? 1 : 0;
  } finally {
    await cleanup.runAll();
    if (!interrupted) console.log(`\ntotal bench time: ${((performance.now() - started) / 1000).toFixed(1)} s`);
  }
}

process.exitCode = await main(process.argv.slice(2));
