import { parseCrontab } from 'graphile-worker';
import { describe, expect, it } from 'vitest';
import { CRONTAB, taskList } from '../../src/jobs/tasks.ts';

describe('crontab', () => {
  it('parses, and every entry names a task the worker knows', () => {
    const items = parseCrontab(CRONTAB);
    expect(items.length).toBeGreaterThan(0);
    const known = Object.keys(taskList({} as Parameters<typeof taskList>[0]));
    for (const item of items) expect(known).toContain(item.task);
    expect(items.map((i) => i.task)).toEqual(expect.arrayContaining(['connectors_tick', 'requests_tick', 'maintenance_tick']));
  });
});
