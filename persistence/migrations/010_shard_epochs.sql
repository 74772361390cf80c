-- Each shard's epoch: the number of times a copy of it started anew (ShardStore.connect). A copy
-- that reconnects after losing its session serves on only while the epoch is still its own; a
-- newer copy's start moves it on. So a copy can tell "the holder of my lock is stale" (its own
-- old session, kept by Postgres after a network blip, or an older copy that took a free lock:
-- end it at once) from "a newer copy has started" (stop). Keyed by the advisory lock's id.
CREATE TABLE IF NOT EXISTS shard_epochs (
    lock_id bigint PRIMARY KEY,
    epoch   bigint NOT NULL
);
