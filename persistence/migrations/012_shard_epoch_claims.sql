-- Which copy moved each shard's epoch on last (a token of its own): a copy whose reply to that
-- statement was lost still knows the epoch for its own, instead of taking itself for superseded
-- (or for a stranger to the session it left holding the lock).
-- Written as '<token>:<epoch>': an older version's copy moves the epoch on without touching it.
ALTER TABLE shard_epochs ADD COLUMN IF NOT EXISTS claimed_by text;
