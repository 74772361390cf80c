-- A shard decides a new ReserveStock without first asking Postgres whether the reservation
-- existed and was closed (released, expired, shipped): that lookup was a round trip on every
-- batch's critical path. Instead the batch statement counts, in its own snapshot, the
-- reservations it took for new that Postgres knows closed, and this function aborts the
-- statement when there is any; the shard then decides the batch again with what Postgres
-- remembers (actors/shard.py, ShardCore.process).
CREATE OR REPLACE FUNCTION inventory_expect_unseen(closed bigint)
RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    IF closed <> 0 THEN
        RAISE EXCEPTION 'inventory closed reservation retried: % of the batch''s new reservations', closed
            USING ERRCODE = 'P0001';
    END IF;
    RETURN 0;
END
$$;
