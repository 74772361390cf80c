-- A purchase order's receipt takes out of in_transit only what the order itself has there
-- (in_transit also holds transfers' and other orders' units): the handler sums the order's
-- purchase_ordered and purchase_received rows (queries.purchase_progress). This index covers
-- both; it replaces 007's, which covered the receipts only. Both are partial: purchase rows are
-- few beside the reservations' ledger rows.
--
-- On a large ledger the CREATE INDEX below holds a write lock while it builds: create it first
-- with CREATE INDEX CONCURRENTLY (same definition), and this migration then does nothing but
-- drop the old index.
CREATE INDEX IF NOT EXISTS movements_purchases
    ON movements (organization_id, reference_id) WHERE type IN ('purchase_ordered', 'purchase_received');
DROP INDEX IF EXISTS movements_purchase_received;
