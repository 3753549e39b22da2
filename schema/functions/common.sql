-- schema/functions/common.sql: Helpers shared by the lifecycle functions.
--
-- Every aiservice.* function is public: other services may call them directly.
-- Domain errors are raised with these SQLSTATEs (documented in README.md):
--   AS404  job not found
--   AS409  job is in the wrong state for the operation
--   AS410  lease lost: the job is no longer this worker's running job (fencing)
--   AS422  invalid argument
-- Every function that writes several jobs locks them in ascending id order (or skips locked
-- ones), so that two of them never wait for each other in a cycle (deadlock).
-- Current definitions, re-applied by the migrator whenever this file changes.

CREATE OR REPLACE FUNCTION aiservice.raise_not_found(p_id bigint) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'job % not found', p_id USING ERRCODE = 'AS404';
END;
$$;

-- The delay before retry number p_attempts + 1: 10 s doubling per attempt,
-- capped at one hour, with +/-25 % jitter so failed batches do not return in step.
CREATE OR REPLACE FUNCTION aiservice.backoff(p_attempts integer) RETURNS interval
LANGUAGE sql VOLATILE
AS $$
    SELECT least(interval '1 hour', interval '10 seconds' * power(2, least(greatest(p_attempts - 1, 0), 20)))
           * (0.75 + random() * 0.5);
$$;

-- Whether a job in this status has finished (completed, failed or cancelled): it will not run again
-- unless retried.
CREATE OR REPLACE FUNCTION aiservice.is_finished(p_status aiservice.job_status) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT p_status IN ('completed', 'failed', 'cancelled');
$$;

-- Failure categories that are retried by default (a caller may override per call).
CREATE OR REPLACE FUNCTION aiservice.is_retryable(p_category text) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT p_category IN ('timeout', 'rate_limited', 'provider_unavailable', 'provider_error', 'lease_expired', 'worker_shutdown');
$$;

-- Refuse a retry_jobs or cancel_jobs call without a filter unless p_all is true. The error names
-- the constraint <action>_jobs_filter_required, so that the HTTP API can say it in its own words
-- ("all": true) while SQL callers read p_all.
CREATE OR REPLACE FUNCTION aiservice.require_filter(p_action text, p_given boolean, p_all boolean) RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF NOT p_given AND NOT coalesce(p_all, false) THEN
        RAISE EXCEPTION 'refusing to % every job: give a filter, or p_all => true', p_action
            USING ERRCODE = 'AS422', CONSTRAINT = p_action || '_jobs_filter_required';
    END IF;
END;
$$;
