-- aiservice 0012: claims under limits read the trailing minute at a time they give, and a
-- rate-limited failure cools a profile down for a bounded time.
--
-- * limit_usage_of and limit_budget gain p_at: a claim reads the trailing minute, and stamps its
--   starts, at the clock time it holds its limits' locks, not at its transaction's start.
-- * fail_job and cool_down gain p_cooldown_max (default 5 minutes): one provider answer cannot
--   hold a whole profile for days. Callers that leave it out keep working.
-- A new argument list is a new function: the old ones are dropped here, the new ones are
-- defined in schema/functions/limits.sql and finish.sql (on a new database the function files
-- have not run yet when this does, hence IF EXISTS).

DROP FUNCTION IF EXISTS aiservice.limit_budget(aiservice.limits);
DROP FUNCTION IF EXISTS aiservice.limit_usage_of(aiservice.limit_scope, text);
DROP FUNCTION IF EXISTS aiservice.cool_down(text, interval);
DROP FUNCTION IF EXISTS aiservice.fail_job(bigint, text, text, text, boolean, interval, uuid);
