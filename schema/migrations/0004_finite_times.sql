-- aiservice 0004: a job's times are finite.
--
-- PostgreSQL accepts 'infinity' and '-infinity' as timestamps (and, from version 17, as
-- intervals). Through the SQL API a caller could create a job due at '-infinity', which broke
-- aiservice.stats() for everyone ("cannot subtract infinite timestamps"), or claim and heartbeat
-- with an infinite lease, which no expiry would ever end. Both are now check violations
-- (SQLSTATE 23514, answered 422 over HTTP like every check violation).
-- NOT VALID first, then VALIDATE: existing rows are checked without blocking writers.

ALTER TABLE aiservice.jobs ADD CONSTRAINT jobs_run_at_finite_check CHECK (isfinite(run_at)) NOT VALID;
ALTER TABLE aiservice.jobs VALIDATE CONSTRAINT jobs_run_at_finite_check;

ALTER TABLE aiservice.jobs ADD CONSTRAINT jobs_lease_finite_check CHECK (isfinite(lease_expires_at)) NOT VALID;
ALTER TABLE aiservice.jobs VALIDATE CONSTRAINT jobs_lease_finite_check;
