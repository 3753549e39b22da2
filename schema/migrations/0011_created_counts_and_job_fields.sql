-- aiservice 0009: jobs created, counted in SQL; the fields of a batch's job as a type.
--
-- aiservice_jobs_created_total counted only the jobs an API process created itself: jobs created
-- through the SQL API were missing. Creations are now counted by the insert trigger, like every
-- other count: job_count_deltas.created holds the jobs each insert added, compact_counts() folds
-- it into job_creations, and stats() answers the totals under "created" (the API's /metrics reads
-- them there). Deleting jobs (retention) never lowers them. Jobs kept now are counted as created.
--
-- Writers wait while the insert trigger changes and the totals are backfilled, so no job is
-- counted twice or missed. The trigger function below is the historical body of this migration;
-- its current definition lives in schema/functions/stats.sql.
--
-- create_jobs reads each job, and its defaults, as aiservice.job_fields: a field a job leaves out
-- or gives as null takes the default (before, an explicit null skipped the batch's default).

LOCK TABLE aiservice.jobs IN SHARE ROW EXCLUSIVE MODE;

ALTER TABLE aiservice.job_count_deltas ADD COLUMN created bigint NOT NULL DEFAULT 0;

CREATE TABLE aiservice.job_creations (
    task_type     text NOT NULL,
    model_profile text NOT NULL,
    n             bigint NOT NULL,
    PRIMARY KEY (task_type, model_profile)
);

CREATE OR REPLACE FUNCTION aiservice.count_inserted() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO aiservice.job_count_deltas (task_type, model_profile, status, n, created)
    SELECT task_type, model_profile, status, count(*), count(*) FROM new_jobs GROUP BY 1, 2, 3;
    RETURN NULL;
END;
$$;

INSERT INTO aiservice.job_creations (task_type, model_profile, n)
SELECT task_type, model_profile, count(*) FROM aiservice.jobs GROUP BY 1, 2;

-- The fields of a job to create as create_jobs reads them from JSON (a job of p_jobs, or p_defaults).
CREATE TYPE aiservice.job_fields AS (
    owner_service   text,
    owner_ref       text,
    task_type       text,
    model_profile   text,
    input           jsonb,
    priority        integer,
    run_at          timestamptz,
    max_attempts    integer,
    idempotency_key text
);
