-- aiservice 0013: batch counts that hold no lock until commit.
--
-- A statement that moved batch jobs used to update the batches rows at once and hold their locks
-- until commit. A claim locks its capped limits, and its housekeeping (expire_leases, promote_due,
-- resolve_dependencies) and the claim itself move batch jobs, so two claims could each hold a
-- batch one needed and wait for a limit the other held: a deadlock.
--
-- The statement trigger now appends the moves to batch_count_deltas (no lock taken), and a
-- deferred constraint trigger folds the transaction's moves into batches when it commits, every
-- batch of the transaction in id order: batches are the last locks any transaction takes, in one
-- order, so they close no cycle. Reads stay exact: the moves are folded before the commit makes
-- the jobs' new statuses visible, and get_batch adds the reader's own moves not folded yet. The
-- batch-finished notification and webhook are still sent by the one transaction that finished
-- the batch. The function below is the historical body of this migration; its current
-- definition lives in schema/functions/delivery.sql.

CREATE TABLE aiservice.batch_count_deltas (
    xact      xid8 NOT NULL DEFAULT pg_current_xact_id(),
    batch_id  bigint NOT NULL,  -- no foreign key: its KEY SHARE lock would wait for the fold
    pending   integer NOT NULL DEFAULT 0,
    running   integer NOT NULL DEFAULT 0,
    completed integer NOT NULL DEFAULT 0,
    failed    integer NOT NULL DEFAULT 0,
    cancelled integer NOT NULL DEFAULT 0
);
CREATE INDEX batch_count_deltas_xact_idx ON aiservice.batch_count_deltas (xact, batch_id);

CREATE FUNCTION aiservice.fold_batch_counts() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RETURN NULL;
END;
$$;

CREATE CONSTRAINT TRIGGER batch_count_deltas_fold
    AFTER INSERT ON aiservice.batch_count_deltas
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION aiservice.fold_batch_counts();
