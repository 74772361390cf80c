-- Inventory Service schema, version 1.
-- One vocabulary: the column names are the proto field names and the struct fields.
-- Quantities are int4 (the API's int32). Times are timestamptz (UTC).

CREATE TABLE IF NOT EXISTS warehouses (
    organization_id text        NOT NULL,
    warehouse_id    text        NOT NULL,
    name            text        NOT NULL DEFAULT '',
    active          boolean     NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, warehouse_id)
);

-- The snapshot of each stock, written only by the shard that owns its key.
-- shard_hash = crc32(organization_id || '/' || variant_id): shard id = shard_hash % shard count.
CREATE TABLE IF NOT EXISTS stocks (
    organization_id text        NOT NULL,
    variant_id      text        NOT NULL,
    warehouse_id    text        NOT NULL,
    stock_id        uuid        NOT NULL DEFAULT gen_random_uuid(),
    shard_hash      bigint      NOT NULL,
    on_hand         integer     NOT NULL DEFAULT 0,
    reserved        integer     NOT NULL DEFAULT 0,
    in_transit      integer     NOT NULL DEFAULT 0,
    min_stock       integer     NOT NULL DEFAULT 0,
    max_stock       integer     NOT NULL DEFAULT 0,
    reorder_point   integer     NOT NULL DEFAULT 0,
    status          text        NOT NULL DEFAULT 'active',
    version         bigint      NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, variant_id, warehouse_id),
    -- The last line of defence against overselling: the database refuses it too.
    CONSTRAINT stock_not_oversold CHECK (reserved >= 0 AND reserved <= on_hand AND in_transit >= 0)
);
CREATE UNIQUE INDEX IF NOT EXISTS stocks_stock_id ON stocks (stock_id);

-- One row per reservation: its lines may live in several shards.
-- open_lines counts lines not yet closed; the shard that brings it to 0 by expiry
-- writes the one inventory.reservation.expired event.
CREATE TABLE IF NOT EXISTS reservations (
    reservation_id  text        NOT NULL,
    organization_id text        NOT NULL,
    order_id        text        NOT NULL,
    items_hash      text        NOT NULL,
    expires_at      timestamptz NOT NULL,
    status          text        NOT NULL,
    open_lines      integer     NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, reservation_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS reservations_order ON reservations (organization_id, order_id);

CREATE TABLE IF NOT EXISTS reservation_lines (
    reservation_id  text        NOT NULL,
    organization_id text        NOT NULL,
    variant_id      text        NOT NULL,
    warehouse_id    text        NOT NULL,
    shard_hash      bigint      NOT NULL,
    order_id        text        NOT NULL,
    quantity        integer     NOT NULL CHECK (quantity > 0),
    expires_at      timestamptz NOT NULL,
    items_hash      text        NOT NULL,
    -- active | confirmed (open) ; released | expired | shipped (closed)
    status          text        NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (reservation_id, organization_id, variant_id, warehouse_id)
);
CREATE INDEX IF NOT EXISTS reservation_lines_open
    ON reservation_lines (organization_id, variant_id) WHERE status IN ('active', 'confirmed');
CREATE INDEX IF NOT EXISTS reservation_lines_due
    ON reservation_lines (expires_at) WHERE status = 'active';

-- The ledger: one row per change of a stock, append-only.
-- on_hand = sum(on_hand_delta), reserved = sum(reserved_delta) per stock.
CREATE TABLE IF NOT EXISTS movements (
    movement_id      bigserial   PRIMARY KEY,
    organization_id  text        NOT NULL,
    variant_id       text        NOT NULL,
    warehouse_id     text        NOT NULL,
    type             text        NOT NULL,
    on_hand_delta    integer     NOT NULL DEFAULT 0,
    reserved_delta   integer     NOT NULL DEFAULT 0,
    in_transit_delta integer     NOT NULL DEFAULT 0,
    reason           text        NOT NULL DEFAULT '',
    reference_id     text        NOT NULL DEFAULT '',
    source           text        NOT NULL DEFAULT '',
    version          bigint      NOT NULL,
    occurred_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS movements_stock
    ON movements (organization_id, variant_id, warehouse_id, movement_id DESC);
CREATE INDEX IF NOT EXISTS movements_reference
    ON movements (organization_id, reference_id) WHERE reference_id <> '';

-- Events to publish, written in the same transaction as the change they describe.
CREATE TABLE IF NOT EXISTS outbox (
    id              bigserial   PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    event_name      text        NOT NULL,
    organization_id text        NOT NULL,
    payload         jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (id) WHERE sent_at IS NULL;

-- Replies of idempotent commands (movements with an idempotency_key, transfers).
CREATE TABLE IF NOT EXISTS idempotency (
    organization_id text        NOT NULL,
    key             text        NOT NULL,
    reply           bytea       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, key)
);
