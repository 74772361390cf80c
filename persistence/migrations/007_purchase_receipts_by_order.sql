-- A purchase_order.created handled after its .received (a retry puts a failed message behind
-- later ones) must not add the delivered quantity to in_transit again, for good: the handler
-- asks how much of the purchase order was received already (queries.purchase_received). Only
-- receipt rows are indexed: they are few beside the reservations' ledger rows.
--
-- On a large ledger the CREATE INDEX below holds a write lock while it builds: create it first
-- with CREATE INDEX CONCURRENTLY (same definition), and this migration then does nothing.
CREATE INDEX IF NOT EXISTS movements_purchase_received
    ON movements (organization_id, reference_id) WHERE type = 'purchase_received';
