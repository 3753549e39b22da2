-- aiservice 0016: the reads the operator console needs stay index scans.
--
-- list_jobs gains p_error_category (schema/functions/read.sql): a new argument list is a new
-- function, so the old one goes where it exists (callers using named arguments, or the old
-- positions, keep working against the new one). A job carries an error_category only while it is failed, or
-- pending after a retryable failure (completing or retrying a job clears it), so a partial index
-- stays small and completing a job costs no entry in it.
--
-- list_batches (schema/functions/delivery.sql) pages batches newest first, optionally of one
-- owner_service: the primary key serves the first, (owner_service, id) the second.

DROP FUNCTION IF EXISTS aiservice.list_jobs(
    text, text, text, text, aiservice.job_status[], timestamptz, timestamptz, bigint[], bigint, integer, bigint[]
);

CREATE INDEX jobs_error_idx ON aiservice.jobs (error_category, id) WHERE error_category IS NOT NULL;

CREATE INDEX batches_owner_idx ON aiservice.batches (owner_service, id);
