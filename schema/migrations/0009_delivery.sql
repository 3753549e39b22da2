-- aiservice 0009: result delivery without polling.
--
-- * Batches: POST /jobs/batch (create_jobs) makes one batch; its counts are kept by a
--   statement trigger, so reading a batch never counts its jobs.
-- * Channel 'aiservice_finished' tells SQL callers that jobs finished (schema/functions/notify.sql).
-- * Webhooks: endpoints per owner_service and an outbox of deliveries written in the same
--   transaction that finishes a job or a batch, so a crash between finishing and sending loses
--   nothing. Delivery runs in the API processes (schema/functions/webhooks.sql).

CREATE TABLE aiservice.batches (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_service text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    total         integer NOT NULL,
    pending       integer NOT NULL DEFAULT 0,
    running       integer NOT NULL DEFAULT 0,
    completed     integer NOT NULL DEFAULT 0,
    failed        integer NOT NULL DEFAULT 0,
    cancelled     integer NOT NULL DEFAULT 0,
    CONSTRAINT batches_counts_check
        CHECK (pending + running + completed + failed + cancelled <= total AND least(pending, running) >= 0)
);

ALTER TABLE aiservice.jobs ADD COLUMN batch_id bigint;
CREATE INDEX jobs_batch_idx ON aiservice.jobs (batch_id, id) WHERE batch_id IS NOT NULL;

CREATE TABLE aiservice.webhooks (
    owner_service text PRIMARY KEY,
    url           text NOT NULL,
    events        text[] NOT NULL DEFAULT '{job.finished,batch.finished}',
    secret        text NOT NULL,
    disabled_at   timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhooks_url_check CHECK (url ~ '^https?://[^\s]+$' AND length(url) <= 2000),
    CONSTRAINT webhooks_events_check
        CHECK (events <@ '{job.finished,batch.finished}' AND cardinality(events) BETWEEN 1 AND 2)
);

CREATE TABLE aiservice.webhook_deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_service   text NOT NULL,
    event           text NOT NULL,
    job_id          bigint,
    batch_id        bigint,
    status          text NOT NULL DEFAULT 'pending',
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    last_status     integer,
    last_error      text,
    CONSTRAINT webhook_deliveries_status_check CHECK (status IN ('pending', 'delivered', 'failed')),
    CONSTRAINT webhook_deliveries_event_check CHECK (event IN ('job.finished', 'batch.finished'))
) WITH (fillfactor = 80);
CREATE INDEX webhook_deliveries_due_idx ON aiservice.webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_owner_idx ON aiservice.webhook_deliveries (owner_service, status, id);

-- list_jobs gains p_batch_ids (schema/functions/read.sql): a new argument list is a new function.
DROP FUNCTION aiservice.list_jobs(text, text, text, text, aiservice.job_status[], timestamptz, timestamptz, bigint[], bigint, integer);
