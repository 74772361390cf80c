-- Every reservation writes a header, a line and a ledger row, and every close another ledger
-- row; each index on them is one more insertion per row. Two indexes served no query:
--
-- * reservations_by_order: nothing looks a reservation up by order id (the reservation id is
--   derived from (organization_id, order_id), so a lookup by order computes the id and uses
--   the primary key).
-- * movements_reference indexed every ledger row with a reference (every reservation
--   movement carries its reservation id); the one query by reference finds a shipped
--   transfer (queries.transfer_in_transit), so the index now holds only those rows.
--
-- On a large ledger the CREATE INDEX below holds a write lock while it builds: create
-- movements_transfer_in_transit first with CREATE INDEX CONCURRENTLY (same definition) and
-- this migration only drops the old indexes.
DROP INDEX IF EXISTS reservations_by_order;
CREATE INDEX IF NOT EXISTS movements_transfer_in_transit
    ON movements (organization_id, reference_id) WHERE type = 'transfer_in_transit';
DROP INDEX IF EXISTS movements_reference;
