-- The session that holds a shard's lock for its current epoch (pid and backend_start: a pid
-- alone may be reused). A copy reconnecting with the current epoch ends only that session (its
-- own old one, kept by Postgres after a network blip), never another: a fresh copy that holds
-- the lock and has not yet moved the epoch on, or a copy of an older version.
ALTER TABLE shard_epochs ADD COLUMN IF NOT EXISTS holder_pid integer;
ALTER TABLE shard_epochs ADD COLUMN IF NOT EXISTS holder_start timestamptz;
