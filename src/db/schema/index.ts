export * from './product.ts';
export * from './privacy.ts';
