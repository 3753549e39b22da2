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
BEGIN
    SELECT * INTO v_batch FROM aiservice.batches WHERE id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'batch % not found', p_id USING ERRCODE = 'AS404';
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
    UPDATE aiservice.jobs j
    SET status = 'cancelled', lease_token = NULL, lease_expires_at = NULL, finished_at = now(), updated_at = now()
    FROM (SELECT id FROM aiservice.jobs
          WHERE batch_id = p_id AND status IN ('pending', 'running')
          ORDER BY id FOR UPDATE) mine
    WHERE j.id = mine.id AND j.status IN ('pending', 'running');
    RETURN aiservice.get_batch(p_id);
END;
$$;

-- Count jobs created into batches.
CREATE OR REPLACE FUNCTION aiservice.delivery_inserted() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE aiservice.batches b
    SET total = b.total + d.n, pending = b.pending + d.n
    FROM (SELECT batch_id, count(*)::integer AS n FROM new_jobs WHERE batch_id IS NOT NULL GROUP BY 1) d
    WHERE b.id = d.batch_id;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER jobs_delivery_insert
    AFTER INSERT ON aiservice.jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION aiservice.delivery_inserted();

-- Jobs that changed status: batch counts move, finished jobs are announced on
-- 'aiservice_finished' and queued for their owner's webhook, and a batch whose last job
-- finished is announced (and queued) once.
CREATE OR REPLACE FUNCTION aiservice.delivery_updated() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    v_batch record;
    v_was timestamptz;
    v_row aiservice.batches;
BEGIN
    PERFORM pg_notify('aiservice_finished', json_build_object('jobs', json_agg(f.doc ORDER BY f.id))::text)
    FROM (
        SELECT n.id, d.doc,
               -- chunks of at most ~7,000 bytes: PostgreSQL refuses payloads of 8,000 and more
               (sum(octet_length(d.doc::text) + 1) OVER (ORDER BY n.id)) / 7000 AS chunk
        FROM new_jobs n JOIN old_jobs o ON o.id = n.id
        CROSS JOIN LATERAL (SELECT json_build_object('id', n.id, 'owner_service', n.owner_service,
                                                     'owner_ref', n.owner_ref, 'status', n.status,
                                                     'batch_id', n.batch_id) AS doc) d
        WHERE aiservice.is_finished(n.status) AND NOT aiservice.is_finished(o.status)
    ) f
    GROUP BY f.chunk;

    IF EXISTS (SELECT 1 FROM aiservice.webhooks) THEN
        INSERT INTO aiservice.webhook_deliveries (owner_service, event, job_id, batch_id)
        SELECT n.owner_service, 'job.finished', n.id, n.batch_id
        FROM new_jobs n JOIN old_jobs o ON o.id = n.id
        JOIN aiservice.webhooks w ON w.owner_service = n.owner_service
        WHERE aiservice.is_finished(n.status) AND NOT aiservice.is_finished(o.status)
          AND w.disabled_at IS NULL AND 'job.finished' = ANY (w.events)
        ORDER BY n.id;
    END IF;

    -- Batches: lock in id order (concurrent statements over the same batches wait, never deadlock).
    FOR v_batch IN
        WITH moves AS (
            SELECT n.batch_id, n.status, 1 AS d FROM new_jobs n JOIN old_jobs o ON o.id = n.id
            WHERE n.batch_id IS NOT NULL AND n.status <> o.status
            UNION ALL
            SELECT o.batch_id, o.status, -1 FROM new_jobs n JOIN old_jobs o ON o.id = n.id
            WHERE o.batch_id IS NOT NULL AND n.status <> o.status
        )
        SELECT batch_id,
               sum(d) FILTER (WHERE status = 'pending')::integer AS pending,
               sum(d) FILTER (WHERE status = 'running')::integer AS running,
               sum(d) FILTER (WHERE status = 'completed')::integer AS completed,
               sum(d) FILTER (WHERE status = 'failed')::integer AS failed,
               sum(d) FILTER (WHERE status = 'cancelled')::integer AS cancelled
        FROM moves GROUP BY batch_id ORDER BY batch_id
    LOOP
        SELECT finished_at INTO v_was FROM aiservice.batches WHERE id = v_batch.batch_id FOR UPDATE;
        UPDATE aiservice.batches b
        SET pending = b.pending + coalesce(v_batch.pending, 0),
            running = b.running + coalesce(v_batch.running, 0),
            completed = b.completed + coalesce(v_batch.completed, 0),
            failed = b.failed + coalesce(v_batch.failed, 0),
            cancelled = b.cancelled + coalesce(v_batch.cancelled, 0),
            finished_at = CASE WHEN b.pending + coalesce(v_batch.pending, 0) + b.running + coalesce(v_batch.running, 0) = 0
                               THEN coalesce(b.finished_at, now()) END
        WHERE b.id = v_batch.batch_id
        RETURNING b.* INTO v_row;
        IF v_was IS NULL AND v_row.finished_at IS NOT NULL THEN
            PERFORM aiservice.batch_finished(v_row);
        END IF;
    END LOOP;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER jobs_delivery_update
    AFTER UPDATE ON aiservice.jobs
    REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION aiservice.delivery_updated();

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

-- Register or change the endpoint of an owner_service. p_events NULL keeps the current events
-- (both for a new endpoint). p_secret (generated by the caller) becomes the signing secret when
-- the endpoint is new or p_rotate is true; secret_shown says whether it did, so the HTTP layer
-- shows a secret only then. Re-enables an endpoint disabled by a 410.
CREATE OR REPLACE FUNCTION aiservice.set_webhook(
    p_owner_service text, p_url text, p_secret text, p_events text[] DEFAULT NULL, p_rotate boolean DEFAULT false
)
RETURNS TABLE (hook aiservice.webhooks, secret_shown boolean)
LANGUAGE plpgsql
AS $$
DECLARE
    v_hook aiservice.webhooks;
    v_new boolean;
BEGIN
    IF p_url IS NULL OR p_url !~ '^https?://[^\s/?#]+[^\s]*$' OR length(p_url) > 2000 THEN
        RAISE EXCEPTION 'url must be an http:// or https:// URL of at most 2000 characters' USING ERRCODE = 'AS422';
    END IF;
    IF p_events IS NOT NULL
       AND (NOT p_events <@ '{job.finished,batch.finished}' OR cardinality(p_events) NOT BETWEEN 1 AND 2) THEN
        RAISE EXCEPTION 'events must be a non-empty list of job.finished, batch.finished' USING ERRCODE = 'AS422';
    END IF;
    IF p_owner_service IS NULL OR length(p_owner_service) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'owner_service must be 1 to 200 characters' USING ERRCODE = 'AS422';
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

-- Take up to p_limit due deliveries for sending: each is leased for p_lease (a sender that
-- dies mid-delivery leaves it to be sent again then: at-least-once). Returns what the sender
-- needs: the endpoint, its secret, the event and its data (the job as GET /jobs/{id} shows it,
-- read now, or the batch).
CREATE OR REPLACE FUNCTION aiservice.claim_deliveries(p_limit integer DEFAULT 50, p_lease interval DEFAULT interval '1 minute')
RETURNS TABLE (id bigint, owner_service text, event text, attempts integer, created_at timestamptz,
               url text, secret text, job jsonb, batch jsonb)
LANGUAGE sql
AS $$
    WITH due AS (
        SELECT d.id FROM aiservice.webhook_deliveries d
        WHERE d.status = 'pending' AND d.next_attempt_at <= now()
        ORDER BY d.next_attempt_at
        LIMIT p_limit
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
    LEFT JOIN aiservice.jobs j ON j.id = t.job_id AND t.event = 'job.finished'
    ORDER BY t.id;
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
