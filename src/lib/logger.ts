import { pino, type Logger } from 'pino';

export type { Logger };

/**
 * Logs never carry personal data: call sites log ids and codes only, and the redaction list is a second line of
 * defence for fields that must never be printed even if someone passes a whole object.
 */
const BASE = { service: 'dsr-connector' };

/**
 * How pino's browser build (what Workers run) writes a line: one JSON object as Node's pino writes it, with the base
 * fields that build leaves out, through the console method of its level, which is the level Workers Logs, `wrangler
 * tail` and `wrangler dev --log-level` go by (console.log would make every line, errors too, a plain "log").
 */
function consoleWriter(write: (line: string) => void) {
  return (o: object) => {
    const { level, time, ...fields } = o as { level?: number; time?: number };
    write(JSON.stringify({ level, time, ...BASE, ...fields }));
  };
}

/* eslint-disable no-console -- the console is where Workers take logs from */
const WORKERS_CONSOLE = {
  fatal: consoleWriter((line) => console.error(line)),
  error: consoleWriter((line) => console.error(line)),
  warn: consoleWriter((line) => console.warn(line)),
  info: consoleWriter((line) => console.info(line)),
  debug: consoleWriter((line) => console.debug(line)),
  trace: consoleWriter((line) => console.debug(line)),
};
/* eslint-enable no-console */

export function createLogger(level: string, destination?: pino.DestinationStream): Logger {
  return pino(
    {
      level,
      base: BASE,
      redact: {
        paths: [
          'email',
          '*.email',
          'password',
          '*.password',
          'token',
          '*.token',
          'authorization',
          '*.authorization',
          'headers',
          '*.headers',
          'subjectValue',
          '*.subjectValue',
          'newPassword',
          '*.newPassword',
          'secret',
          '*.secret',
          'secrets',
          '*.secrets',
          'cookie',
          '*.cookie',
          'key',
          '*.key',
        ],
        censor: '[redacted]',
      },
      // Workers bundle pino's browser build, which applies the redaction only to logs it builds as one object.
      browser: { asObject: true, write: WORKERS_CONSOLE },
    },
    destination,
  );
}
