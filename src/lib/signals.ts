/**
 * How long after a SIGINT or SIGTERM the same signal again is taken as a copy of it, not as a second request to stop.
 * A terminal's Ctrl-C reaches every process of the foreground group, and `npm start` / `npx` forward the signal they
 * get to their child: when npm's script shell runs the command in place (bash does, and it is macOS's /bin/sh), the
 * process receives one Ctrl-C twice, a few milliseconds apart (systemd stopping `npm start` does the same with SIGTERM).
 * A person's second Ctrl-C comes later.
 */
export const REPEATED_SIGNAL_MS = 500;

/**
 * Calls `onSignal` for every SIGINT and SIGTERM except a copy of the previous one (the same signal within
 * REPEATED_SIGNAL_MS). Returns a function that removes the listeners.
 */
export function onStopSignals(onSignal: (signal: NodeJS.Signals) => void): () => void {
  let last: { signal: NodeJS.Signals; at: number } | undefined;
  const listener = (signal: NodeJS.Signals) => {
    const now = performance.now();
    if (last && last.signal === signal && now - last.at < REPEATED_SIGNAL_MS) return;
    last = { signal, at: now };
    onSignal(signal);
  };
  process.on('SIGINT', listener);
  process.on('SIGTERM', listener);
  return () => {
    process.off('SIGINT', listener);
    process.off('SIGTERM', listener);
  };
}
