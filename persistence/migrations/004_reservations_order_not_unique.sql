-- Two shards may insert one cross-shard reservation's header in concurrent transactions; the
-- header upsert resolves that on the primary key (organization_id, reservation_id). A second
-- unique index on (organization_id, order_id) is not covered by that ON CONFLICT: under load
-- the later insert failed on it and took its shard's whole batch down. It guarded nothing the
-- key does not: reservation_id is derived from (organization_id, order_id). Lookups by order
-- keep a plain index.
DROP INDEX IF EXISTS reservations_order;
CREATE INDEX IF NOT EXISTS reservations_by_order ON reservations (organization_id, order_id);
