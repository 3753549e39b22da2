-- aiservice 0008: a scheduler that respects capacity.
--
-- * Jobs not yet due are "scheduled": still status pending for every caller, but kept out
--   of the claim index, so a backlog of retries and future jobs costs a claim nothing.
--   Claims move due jobs forward through their own small index (run_at order).
-- * The claim index leads with model_profile, so a claim for one profile never walks
--   another profile's backlog, and holds owner_service for fair share between callers.
-- * Limits per task_type, model_profile or owner_service: pause, caps on running jobs,
--   starts and tokens per minute, fair-share weight, provider cool-down.
-- Functions: schema/functions/claim.sql and limits.sql.

ALTER TABLE aiservice.jobs ADD COLUMN scheduled boolean NOT NULL DEFAULT false;
UPDATE aiservice.jobs SET scheduled = true WHERE status = 'pending' AND run_at > now();

DROP INDEX aiservice.jobs_claim_idx;
CREATE INDEX jobs_claim_idx ON aiservice.jobs (model_profile, priority DESC, owner_service, id)
    WHERE status = 'pending' AND NOT scheduled;
CREATE INDEX jobs_scheduled_idx ON aiservice.jobs (run_at) WHERE status = 'pending' AND scheduled;

CREATE TYPE aiservice.limit_scope AS ENUM ('task_type', 'model_profile', 'owner_service');

CREATE TABLE aiservice.limits (
    scope                 aiservice.limit_scope NOT NULL,
    name                  text NOT NULL,
    paused                boolean NOT NULL DEFAULT false,
    max_running           integer,
    max_per_minute        integer,
    max_tokens_per_minute bigint,
    weight                integer NOT NULL DEFAULT 1,
    -- Provider-wide back-off: set when a job of this model_profile fails rate_limited with a
    -- retry_after, unless cooldown is false.
    cooldown              boolean NOT NULL DEFAULT true,
    cooldown_until        timestamptz,
    updated_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, name),
    CONSTRAINT limits_name_check CHECK (length(name) BETWEEN 1 AND 200),
    CONSTRAINT limits_max_running_check CHECK (max_running BETWEEN 0 AND 1000000),
    CONSTRAINT limits_max_per_minute_check CHECK (max_per_minute BETWEEN 0 AND 100000000),
    CONSTRAINT limits_max_tokens_per_minute_check CHECK (max_tokens_per_minute BETWEEN 0 AND 1000000000000),
    CONSTRAINT limits_weight_check CHECK (weight BETWEEN 1 AND 10000),
    CONSTRAINT limits_cooldown_until_check CHECK (isfinite(cooldown_until))
);

COMMENT ON TABLE aiservice.limits IS 'Capacity limits; change them through aiservice.set_limit/delete_limit.';

-- Jobs started and tokens used per limit, for the trailing-minute limits and live usage.
-- Insert-only (no hot counter row); maintain() deletes what is older than two minutes.
CREATE TABLE aiservice.limit_usage (
    scope  aiservice.limit_scope NOT NULL,
    name   text NOT NULL,
    at     timestamptz NOT NULL DEFAULT now(),
    starts integer NOT NULL DEFAULT 0,
    tokens bigint NOT NULL DEFAULT 0
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);
CREATE INDEX limit_usage_idx ON aiservice.limit_usage (scope, name, at);

-- Claims received per owner_service and model_profile, divided by the owner's weight.
CREATE TABLE aiservice.fair_share (
    model_profile text NOT NULL,
    owner_service text NOT NULL,
    served        float8 NOT NULL DEFAULT 0,
    PRIMARY KEY (model_profile, owner_service)
);

-- A limit with its live usage, as list_limits() and set_limit() return it.
CREATE TYPE aiservice.limit_state AS (
    scope                 aiservice.limit_scope,
    name                  text,
    paused                boolean,
    max_running           integer,
    max_per_minute        integer,
    max_tokens_per_minute bigint,
    weight                integer,
    cooldown              boolean,
    cooldown_until        timestamptz,
    running               bigint,
    started_last_minute   bigint,
    tokens_last_minute    bigint
);
