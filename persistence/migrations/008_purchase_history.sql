-- Who supplied a stock, and how long its purchase orders took: what `inventory.stock.reorder_needed`
-- carries as `last_supplier_id` and `average_lead_time_days` (the spec's payload). One row per
-- purchase order, variant and warehouse, written by the consumer of Purchasing's events after
-- the movement: `ordered_at` by purchase_order.created, `received_at` by the first
-- purchase_order.received (either may come first; both are upserts and replays change nothing).
-- Times are the events' `occurred_at` when they carry one, else when they were handled.
CREATE TABLE IF NOT EXISTS purchase_order_lines (
    organization_id   text        NOT NULL,
    purchase_order_id text        NOT NULL,
    variant_id        text        NOT NULL,
    warehouse_id      text        NOT NULL,
    supplier_id       text        NOT NULL DEFAULT '',
    ordered_at        timestamptz,
    received_at       timestamptz,
    PRIMARY KEY (organization_id, purchase_order_id, variant_id, warehouse_id)
);
CREATE INDEX IF NOT EXISTS purchase_order_lines_by_stock
    ON purchase_order_lines (organization_id, variant_id, warehouse_id, ordered_at DESC NULLS LAST);
