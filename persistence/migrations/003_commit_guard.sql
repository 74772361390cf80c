-- A shard commits a batch as one statement (data-modifying CTEs, persistence/store.py).
-- The statement must fail as a whole when a version-guarded update or an insert of new
-- stocks touched fewer rows than expected (another writer exists): this function raises,
-- which aborts the statement, so nothing of the batch is written.
CREATE OR REPLACE FUNCTION inventory_expect_rows(actual bigint, expected bigint, what text)
RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    IF actual <> expected THEN
        RAISE EXCEPTION 'inventory stale version: % of % % written', actual, expected, what
            USING ERRCODE = 'P0001';
    END IF;
    RETURN actual;
END
$$;
