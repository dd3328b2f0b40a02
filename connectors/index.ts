/** The registry: the one place that lists the vendors. The core looks adapters up here and never names a vendor. */
import { datagrail } from './datagrail/index.ts';
import { onetrust } from './onetrust/index.ts';
import { transcend } from './transcend/index.ts';
import type { Connector, Vendor } from './types.ts';

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type AnyConnector = Connector<any, any>;

export const CONNECTORS: Record<Vendor, AnyConnector> = { transcend, onetrust, datagrail };

export function connectorFor(vendor: string): AnyConnector | undefined {
  return Object.hasOwn(CONNECTORS, vendor) ? CONNECTORS[vendor as Vendor] : undefined;
}
