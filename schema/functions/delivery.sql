-- schema/functions/delivery.sql: result delivery: batches, the 'aiservice_finished' channel,
-- and the webhook outbox written in the transaction that finishes a job.
-- Current definitions, re-applied by the migrator whenever this file changes.
--
-- Channel 'aiservice_finished' (payloads documented in README.md):
--   {"jobs": [{"id", "owner_service", "owner_ref", "status", "batch_id"}, ...]}
--       jobs reached completed, failed or cancelled; a statement that finishes many jobs sends
--       few notifications, each under 8,000 bytes;
--   {"batch_finished": true, "batch_id", "owner_service"}  the last job of a batch finished.

CREATE OR REPLACE FUNCTION aiservice.is_finished(p_status aiservice.job_status) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT p_status IN ('completed', 'failed', 'cancelled');
$$;

-- A batch as GET /batches/{id} shows it.
CREATE OR REPLACE FUNCTION aiservice.batch_json(p_batch aiservice.batches) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT jsonb_build_object(
        'id', p_batch.id, 'owner_service', p_batch.owner_service,
        'created_at', p_batch.created_at, 'finished_at', p_batch.finished_at,
        'status', CASE WHEN p_batch.finished_at IS NULL THEN 'in_progress' ELSE 'finished' END,
        'counts', jsonb_build_object(
            'total', p_batch.total, 'pending', p_batch.pending, 'running', p_batch.running,
            'completed', p_batch.completed, 'failed', p_batch.failed, 'cancelled', p_batch.cancelled));
$$;

CREATE OR REPLACE FUNCTION aiservice.get_batch(p_id bigint) RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_batch aiservice.batches;
    v_moves integer;
BEGIN
    SELECT * INTO v_batch FROM aiservice.batches WHERE id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'batch % not found', p_id USING ERRCODE = 'AS404';
    END IF;
    -- This transaction's own moves, folded into the row only when it commits; nobody else's
    -- are visible (they are folded before their jobs' new statuses are).
    SELECT count(*), v_batch.pending + coalesce(sum(d.pending), 0), v_batch.running + coalesce(sum(d.running), 0),
           v_batch.completed + coalesce(sum(d.completed), 0), v_batch.failed + coalesce(sum(d.failed), 0),
           v_batch.cancelled + coalesce(sum(d.cancelled), 0)
    INTO v_moves, v_batch.pending, v_batch.running, v_batch.completed, v_batch.failed, v_batch.cancelled
    FROM aiservice.batch_count_deltas d
    WHERE d.xact = pg_current_xact_id_if_assigned() AND d.batch_id = p_id;
    IF v_moves > 0 THEN
        v_batch.finished_at := CASE WHEN v_batch.pending + v_batch.running = 0
                                    THEN coalesce(v_batch.finished_at, now()) END;
    END IF;
    RETURN aiservice.batch_json(v_batch);
END;
$$;

-- Batches newest first, each as get_batch shows it, optionally of one owner_service; keyset
-- paging: p_before_id is the last id of the previous page. Each branch walks an index
-- (the primary key, or batches_owner_idx) and reads p_limit rows.
CREATE OR REPLACE FUNCTION aiservice.list_batches(
    p_owner_service text DEFAULT NULL, p_before_id bigint DEFAULT NULL, p_limit integer DEFAULT 50
)
RETURNS SETOF jsonb
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF p_limit < 0 THEN
        RAISE EXCEPTION 'limit must not be negative' USING ERRCODE = 'AS422';
    END IF;
    IF p_owner_service IS NULL THEN
        RETURN QUERY
        SELECT aiservice.batch_json(b) FROM aiservice.batches b
        WHERE b.id < coalesce(p_before_id, 9223372036854775807)
        ORDER BY b.id DESC LIMIT p_limit;
    ELSE
        RETURN QUERY
        SELECT aiservice.batch_json(b) FROM aiservice.batches b
        WHERE b.owner_service = p_owner_service AND b.id < coalesce(p_before_id, 9223372036854775807)
        ORDER BY b.id DESC LIMIT p_limit;
    END IF;
END;
$$;

-- Cancel the batch's pending and running jobs (their workers get an 'abort'); returns the batch.
CREATE OR REPLACE FUNCTION aiservice.cancel_batch(p_id bigint) RETURNS jsonb
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM aiservice.get_batch(p_id);
    PERFORM aiservice.cancel_jobs(p_ids => ARRAY(
        SELECT j.id FROM aiservice.jobs j WHERE j.batch_id = p_id AND j.status IN ('pending', 'running')));
    RETURN aiservice.get_batch(p_id);
END;
$$;

-- Jobs created into batches are counted, and finished jobs announced on 'aiservice_finished', queued
-- for their owner's webhook and their batch moves appended to batch_count_deltas, by the triggers
-- on jobs and job_history (triggers.sql).

-- Fold this transaction's batch moves into batches: run (deferred) when it commits, so the
-- batches rows are the last locks it takes, taken in id order; a batch whose last job finished
-- is announced (and queued) once, by the transaction that finished it. Fires once per delta
-- row; the first firing folds them all and the others find nothing.
CREATE OR REPLACE FUNCTION aiservice.fold_batch_counts() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    v_ids bigint[];
    v_pending integer[];
    v_running integer[];
    v_completed integer[];
    v_failed integer[];
    v_cancelled integer[];
    v_was timestamptz;
    v_row aiservice.batches;
BEGIN
    WITH mine AS (
        DELETE FROM aiservice.batch_count_deltas WHERE xact = pg_current_xact_id() RETURNING *
    )
    SELECT array_agg(batch_id ORDER BY batch_id), array_agg(pending ORDER BY batch_id),
           array_agg(running ORDER BY batch_id), array_agg(completed ORDER BY batch_id),
           array_agg(failed ORDER BY batch_id), array_agg(cancelled ORDER BY batch_id)
    INTO v_ids, v_pending, v_running, v_completed, v_failed, v_cancelled
    FROM (SELECT batch_id, sum(pending)::integer AS pending, sum(running)::integer AS running,
                 sum(completed)::integer AS completed, sum(failed)::integer AS failed,
                 sum(cancelled)::integer AS cancelled
          FROM mine GROUP BY batch_id) m;
    FOR i IN 1..coalesce(cardinality(v_ids), 0) LOOP
        SELECT finished_at INTO v_was FROM aiservice.batches WHERE id = v_ids[i] FOR NO KEY UPDATE;
        CONTINUE WHEN NOT FOUND;  -- deleted meanwhile
        UPDATE aiservice.batches b
        SET pending = b.pending + v_pending[i],
            running = b.running + v_running[i],
            completed = b.completed + v_completed[i],
            failed = b.failed + v_failed[i],
            cancelled = b.cancelled + v_cancelled[i],
            finished_at = CASE WHEN b.pending + v_pending[i] + b.running + v_running[i] = 0
                               THEN coalesce(b.finished_at, now()) END
        WHERE b.id = v_ids[i]
        RETURNING b.* INTO v_row;
        IF v_was IS NULL AND v_row.finished_at IS NOT NULL THEN
            PERFORM aiservice.batch_finished(v_row);
        END IF;
    END LOOP;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION aiservice.batch_finished(p_batch aiservice.batches) RETURNS void
LANGUAGE sql
AS $$
    SELECT pg_notify('aiservice_finished', json_build_object(
        'batch_finished', true, 'batch_id', p_batch.id, 'owner_service', p_batch.owner_service)::text);
    INSERT INTO aiservice.webhook_deliveries (owner_service, event, batch_id)
    SELECT w.owner_service, 'batch.finished', p_batch.id
    FROM aiservice.webhooks w
    WHERE w.owner_service = p_batch.owner_service AND w.disabled_at IS NULL AND 'batch.finished' = ANY (w.events);
$$;

-- Webhook endpoints ------------------------------------------------------------------------

-- Why a webhook URL cannot be sent to, or NULL when it can: http:// or https://, no whitespace, at
-- most 2000 characters, a host (a name, an IPv4 address, or an IPv6 address in brackets) and a port
-- (when given) from 1 to 65535. aiservice/rules.py holds the copy the HTTP door checks first.
CREATE OR REPLACE FUNCTION aiservice.webhook_url_problem(p_url text) RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    v_parts text[];
    v_host text;
    v_port text;
BEGIN
    IF p_url IS NULL OR length(p_url) > 2000 THEN
        RETURN 'url must be an http:// or https:// URL of at most 2000 characters';
    END IF;
    v_parts := regexp_match(p_url, '^https?://([^/?#]*)(.*)$');
    IF v_parts IS NULL THEN
        RETURN 'url must be an http:// or https:// URL';
    END IF;
    IF p_url ~ '\s' THEN
        RETURN 'url must not contain whitespace';
    END IF;
    v_host := regexp_replace(v_parts[1], '^.*@', '');  -- without the userinfo
    IF v_host LIKE '[%' THEN
        v_parts := regexp_match(v_host, '^\[([0-9A-Fa-f:.]+)\](:(.*))?$');
        IF v_parts IS NULL OR v_parts[1] !~ ':' THEN
            RETURN format('url: the host %s is not an IPv6 address in brackets', v_host);
        END IF;
        BEGIN
            PERFORM v_parts[1]::inet;
        EXCEPTION WHEN invalid_text_representation THEN
            RETURN format('url: the host [%s] is not an IPv6 address', v_parts[1]);
        END;
        v_port := v_parts[3];
    ELSE
        v_parts := regexp_match(v_host, '^([^:]*)(:(.*))?$');
        IF v_parts[1] = '' THEN
            RETURN 'url: the host is empty';
        END IF;
        IF v_parts[1] ~ '[][\\<>"{}|^`]' THEN
            RETURN format('url: the host %s holds characters a host name cannot', v_parts[1]);
        END IF;
        v_port := v_parts[3];
    END IF;
    IF v_port <> '' AND (v_port !~ '^[0-9]{1,5}$' OR v_port::integer NOT BETWEEN 1 AND 65535) THEN
        RETURN format('url: the port %s is not a number from 1 to 65535', v_port);
    END IF;
    RETURN NULL;
END;
$$;

-- Register or change the endpoint of an owner_service. p_events NULL keeps the current events
-- (both for a new endpoint). p_secret (generated by the caller) becomes the signing secret when
-- the endpoint is new or p_rotate is true; secret_shown says whether it did, so the HTTP layer
-- shows a secret only then. Re-enables an endpoint disabled by a 410. An owner_service of "." or
-- ".." is refused: the HTTP routes name the endpoint in their path, and URL clients resolve such a
-- segment away even percent-encoded (any other name travels percent-encoded).
CREATE OR REPLACE FUNCTION aiservice.set_webhook(
    p_owner_service text, p_url text, p_secret text, p_events text[] DEFAULT NULL, p_rotate boolean DEFAULT false
)
RETURNS TABLE (hook aiservice.webhooks, secret_shown boolean)
LANGUAGE plpgsql
AS $$
DECLARE
    v_hook aiservice.webhooks;
    v_new boolean;
    v_problem text;
BEGIN
    v_problem := aiservice.webhook_url_problem(p_url);
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION '%', v_problem USING ERRCODE = 'AS422';
    END IF;
    IF p_events IS NOT NULL
       AND (NOT p_events <@ '{job.finished,batch.finished}' OR cardinality(p_events) NOT BETWEEN 1 AND 2) THEN
        RAISE EXCEPTION 'events must be a non-empty list of job.finished, batch.finished' USING ERRCODE = 'AS422';
    END IF;
    IF cardinality(p_events) <> (SELECT count(DISTINCT e) FROM unnest(p_events) e) THEN
        RAISE EXCEPTION 'events must not repeat an event' USING ERRCODE = 'AS422';
    END IF;
    IF p_owner_service IS NULL OR length(p_owner_service) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'owner_service must be 1 to 200 characters' USING ERRCODE = 'AS422';
    END IF;
    IF p_owner_service IN ('.', '..') THEN
        RAISE EXCEPTION 'owner_service "%" cannot have a webhook: it cannot be a segment of a URL path', p_owner_service
            USING ERRCODE = 'AS422';
    END IF;
    IF p_secret IS NULL OR length(p_secret) < 16 THEN
        RAISE EXCEPTION 'secret must be at least 16 characters' USING ERRCODE = 'AS422';
    END IF;
    v_new := NOT EXISTS (SELECT 1 FROM aiservice.webhooks WHERE owner_service = p_owner_service);
    INSERT INTO aiservice.webhooks AS w (owner_service, url, events, secret)
    VALUES (p_owner_service, p_url, coalesce(p_events, '{job.finished,batch.finished}'), p_secret)
    ON CONFLICT (owner_service) DO UPDATE
        SET url = excluded.url,
            events = coalesce(p_events, w.events),
            secret = CASE WHEN p_rotate THEN excluded.secret ELSE w.secret END,
            disabled_at = NULL,
            updated_at = now()
    RETURNING * INTO v_hook;
    RETURN QUERY SELECT v_hook, v_new OR coalesce(p_rotate, false);
END;
$$;

CREATE OR REPLACE FUNCTION aiservice.delete_webhook(p_owner_service text) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    DELETE FROM aiservice.webhooks WHERE owner_service = p_owner_service;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no webhook for %', p_owner_service USING ERRCODE = 'AS404';
    END IF;
    UPDATE aiservice.webhook_deliveries SET status = 'failed', last_error = 'endpoint deleted'
    WHERE owner_service = p_owner_service AND status = 'pending';
END;
$$;

-- Deliveries -------------------------------------------------------------------------------

-- Take up to p_limit due deliveries for sending, at most p_per_endpoint of each endpoint
-- (owner_service) counting those the caller already has in flight (p_busy_owners and
-- p_busy_counts, pairwise), oldest due first: a slow endpoint holds at most its share of a
-- sender's slots. Each is leased for p_lease (a sender that dies mid-delivery leaves it to be
-- sent again then: at-least-once). Returns what the sender needs: the endpoint, its secret, the
-- event and its data (the job as GET /jobs/{id} shows it, read now, or the batch).
CREATE OR REPLACE FUNCTION aiservice.claim_deliveries_v2(
    p_limit integer,
    p_lease interval,
    p_per_endpoint integer,
    p_busy_owners text[] DEFAULT '{}',
    p_busy_counts integer[] DEFAULT '{}'
)
RETURNS TABLE (id bigint, owner_service text, event text, attempts integer, created_at timestamptz,
               url text, secret text, job jsonb, batch jsonb)
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'limit must be between 1 and 1000' USING ERRCODE = 'AS422';
    END IF;
    IF p_per_endpoint IS NULL OR p_per_endpoint < 1 THEN
        RAISE EXCEPTION 'per_endpoint must be at least 1' USING ERRCODE = 'AS422';
    END IF;
    IF p_lease IS NULL OR p_lease <= interval '0' THEN
        RAISE EXCEPTION 'lease must be positive' USING ERRCODE = 'AS422';
    END IF;
    RETURN QUERY
    WITH busy AS (
        SELECT b.owner_service, sum(b.n)::integer AS n
        FROM unnest(p_busy_owners, p_busy_counts) AS b(owner_service, n)
        GROUP BY b.owner_service
    ),
    -- Per endpoint, its oldest due deliveries up to its free slots (webhook_deliveries_owner_due_idx);
    -- the webhooks table has a row per owner_service, few.
    candidates AS (
        SELECT c.id
        FROM aiservice.webhooks w
        LEFT JOIN busy ON busy.owner_service = w.owner_service
        CROSS JOIN LATERAL (
            SELECT d.id, d.next_attempt_at FROM aiservice.webhook_deliveries d
            WHERE d.owner_service = w.owner_service AND d.status = 'pending' AND d.next_attempt_at <= now()
            ORDER BY d.next_attempt_at
            LIMIT greatest(p_per_endpoint - coalesce(busy.n, 0), 0)
        ) c
        ORDER BY c.next_attempt_at
        LIMIT p_limit
    ),
    -- Another sender may have taken some meanwhile: skipped while it holds them, and no longer due
    -- once it committed (the row is checked again when locked).
    due AS (
        SELECT d.id FROM aiservice.webhook_deliveries d
        WHERE d.id = ANY (ARRAY(SELECT candidates.id FROM candidates))  -- primary key lookups
          AND d.status = 'pending' AND d.next_attempt_at <= now()
        FOR UPDATE SKIP LOCKED
    ),
    taken AS (
        UPDATE aiservice.webhook_deliveries d
        SET next_attempt_at = now() + p_lease, attempts = d.attempts + 1
        FROM due WHERE d.id = due.id
        RETURNING d.*
    )
    SELECT t.id, t.owner_service, t.event, t.attempts, t.created_at, w.url, w.secret, to_jsonb(j),
           (SELECT aiservice.batch_json(b) FROM aiservice.batches b WHERE b.id = t.batch_id)
    FROM taken t
    JOIN aiservice.webhooks w ON w.owner_service = t.owner_service
    LEFT JOIN aiservice.all_jobs j ON j.id = t.job_id AND t.event = 'job.finished'
    ORDER BY t.id;
END;
$$;

-- The first version, without per-endpoint limits: kept for senders of earlier releases during a
-- rolling deploy (both lock with SKIP LOCKED, so they share the outbox without sending twice).
-- Up to p_limit due deliveries, leased for p_lease: claim_deliveries_v2 with every endpoint
-- allowed the whole p_limit.
CREATE OR REPLACE FUNCTION aiservice.claim_deliveries(p_limit integer DEFAULT 50, p_lease interval DEFAULT interval '1 minute')
RETURNS TABLE (id bigint, owner_service text, event text, attempts integer, created_at timestamptz,
               url text, secret text, job jsonb, batch jsonb)
LANGUAGE sql
AS $$
    SELECT * FROM aiservice.claim_deliveries_v2(p_limit, p_lease, p_limit);
$$;

-- Record an attempt. p_status is the receiver's HTTP status (NULL: no answer, p_error says why).
-- 2xx delivers; 410 Gone disables the endpoint and fails the delivery; anything else is tried
-- again after a backoff (5 s doubling, at most 1 h, +/-25 % jitter) until p_max_age has passed
-- since the event, then fails.
CREATE OR REPLACE FUNCTION aiservice.record_delivery(
    p_id bigint, p_status integer DEFAULT NULL, p_error text DEFAULT NULL, p_max_age interval DEFAULT interval '24 hours'
)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    v_delivery aiservice.webhook_deliveries;
    v_outcome text;
BEGIN
    SELECT * INTO v_delivery FROM aiservice.webhook_deliveries WHERE id = p_id FOR UPDATE;
    IF NOT FOUND OR v_delivery.status <> 'pending' THEN
        RETURN coalesce(v_delivery.status, 'not_found');
    END IF;
    v_outcome := CASE
        WHEN p_status BETWEEN 200 AND 299 THEN 'delivered'
        WHEN p_status = 410 THEN 'failed'
        WHEN v_delivery.created_at + p_max_age <= now() THEN 'failed'
        ELSE 'pending' END;
    UPDATE aiservice.webhook_deliveries
    SET status = v_outcome,
        last_status = p_status,
        last_error = left(p_error, 1000),
        delivered_at = CASE WHEN v_outcome = 'delivered' THEN now() END,
        next_attempt_at = CASE WHEN v_outcome = 'pending'
            THEN now() + least(interval '1 hour', interval '5 seconds' * power(2, least(attempts - 1, 20)))
                 * (0.75 + random() * 0.5)
            ELSE next_attempt_at END
    WHERE id = p_id;
    IF p_status = 410 THEN
        UPDATE aiservice.webhooks SET disabled_at = now(), updated_at = now()
        WHERE owner_service = v_delivery.owner_service AND disabled_at IS NULL;
    END IF;
    RETURN v_outcome;
END;
$$;

-- Deliveries of an owner's endpoint, newest first (keyset paging with p_before_id). p_status
-- 'retrying' selects the pending deliveries whose last attempt failed (attempts > 0 with an answer
-- or an error recorded): an endpoint that refuses every request shows there long before its
-- deliveries fail for good.
CREATE OR REPLACE FUNCTION aiservice.list_deliveries(
    p_owner_service text, p_status text DEFAULT NULL, p_before_id bigint DEFAULT NULL, p_limit integer DEFAULT 50
)
RETURNS SETOF aiservice.webhook_deliveries
LANGUAGE sql STABLE
AS $$
    SELECT * FROM aiservice.webhook_deliveries d
    WHERE d.owner_service = p_owner_service
      AND (p_status IS NULL OR d.status = CASE WHEN p_status = 'retrying' THEN 'pending' ELSE p_status END)
      AND (p_status IS DISTINCT FROM 'retrying'
           OR (d.attempts > 0 AND (d.last_status IS NOT NULL OR d.last_error IS NOT NULL)))
      AND (p_before_id IS NULL OR d.id < p_before_id)
    ORDER BY d.id DESC
    LIMIT p_limit;
$$;

-- Send a delivery again now (a failed one too); its max age starts over. Returns it.
CREATE OR REPLACE FUNCTION aiservice.retry_delivery(p_owner_service text, p_id bigint)
RETURNS aiservice.webhook_deliveries
LANGUAGE plpgsql
AS $$
DECLARE
    v_delivery aiservice.webhook_deliveries;
BEGIN
    UPDATE aiservice.webhook_deliveries
    SET status = 'pending', next_attempt_at = now(), created_at = now(), delivered_at = NULL
    WHERE id = p_id AND owner_service = p_owner_service
    RETURNING * INTO v_delivery;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no delivery % for %', p_id, p_owner_service USING ERRCODE = 'AS404';
    END IF;
    RETURN v_delivery;
END;
$$;
