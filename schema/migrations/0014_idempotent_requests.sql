-- aiservice 0014: an idempotent repeat is the same request; dependencies outlive retention while needed.
--
-- A create whose idempotency_key names an existing job must repeat the request that made it
-- (create.sql compares them). run_at changes as a job is retried or backed off, so the run_at the
-- creator asked for is kept apart: requested_run_at, NULL when none was given. Keyed jobs created
-- before this migration get '-infinity', "not known": their repeats are not compared on run_at.
--
-- purge_jobs no longer deletes a job that an unfinished job depends on (maintain.sql). Before, it
-- could: the dependency rows of such jobs pointed at nothing, and a dependent whose cancelled
-- dependency was deleted before its dependents were resolved stayed blocked for ever. Those jobs
-- fail here, as they would have when their dependency was resolved; the dependency rows of jobs
-- already deleted go.

ALTER TABLE aiservice.jobs ADD COLUMN requested_run_at timestamptz;
UPDATE aiservice.jobs SET requested_run_at = '-infinity' WHERE idempotency_key IS NOT NULL;

DELETE FROM aiservice.job_dependencies d
WHERE NOT EXISTS (SELECT 1 FROM aiservice.jobs j WHERE j.id = d.job_id);

UPDATE aiservice.jobs j
SET status = 'failed',
    blocked = false,
    scheduled = false,
    error_category = 'dependency_failed',
    error_message = format('dependency %s no longer exists', g.gone),
    finished_at = now(),
    updated_at = now()
FROM (
    SELECT d.job_id, min(d.depends_on) AS gone
    FROM aiservice.job_dependencies d
    WHERE NOT EXISTS (SELECT 1 FROM aiservice.jobs x WHERE x.id = d.depends_on)
    GROUP BY d.job_id
) g
WHERE j.id = g.job_id AND j.status = 'pending' AND j.blocked;

-- claim_jobs_v2 bounds the dependency results one answer carries (p_max_dependency_bytes), and
-- dependencies_of can leave results out; both definitions live in schema/functions/pipelines.sql.
DROP FUNCTION IF EXISTS aiservice.claim_jobs_v2(text, integer, text[], text[], interval);
DROP FUNCTION IF EXISTS aiservice.dependencies_of(bigint);
