export * from './product.ts';
export * from './privacy.ts';
export * from './connectors.ts';
export * from './accounts.ts';
export * from './jobs.ts';
