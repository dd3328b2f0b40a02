import { pino, type Logger } from 'pino';

export type { Logger };

/**
 * Logs never carry personal data: call sites log ids and codes only, and the redaction list is a second line of
 * defence for fields that must never be printed even if someone passes a whole object.
 */
export function createLogger(level: string, destination?: pino.DestinationStream): Logger {
  return pino(
    {
      level,
      base: { service: 'dsr-connector' },
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
      // Workers bundle pino's browser build, which applies the redaction only to logs it builds as one object; written
      // as one JSON line, as in Node (the console is where Workers take logs from).
      // eslint-disable-next-line no-console
      browser: { asObject: true, write: (o) => console.log(JSON.stringify(o)) },
    },
    destination,
  );
}
