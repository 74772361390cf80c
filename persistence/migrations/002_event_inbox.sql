-- Incoming events already handled, so a redelivered or duplicated message has no second effect.
-- One row per (queue, message_key); message_key is "<event>:<event_id or AMQP message_id>".
-- A consumer claims the key (status 'processing', leased until claimed_until) before it acts and
-- marks it 'done' after the effect is committed; a lease that ran out (the consumer died) may be
-- claimed again, and the business flows are idempotent by key for that window.
CREATE TABLE IF NOT EXISTS inbox (
    queue           text        NOT NULL,
    message_key     text        NOT NULL,
    organization_id text        NOT NULL DEFAULT '',
    status          text        NOT NULL,  -- processing | done
    outcome         text        NOT NULL DEFAULT '',
    claimed_until   timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    processed_at    timestamptz,
    PRIMARY KEY (queue, message_key)
);
CREATE INDEX IF NOT EXISTS inbox_done ON inbox (processed_at) WHERE status = 'done';
