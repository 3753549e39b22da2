"""An audit of every change of a job, for the fault tests: test-only row triggers that record each
transition (old and new status, lease token, worker) in public.job_audit of the test database, so
"completed exactly once" is checked on the history, not only on the final rows."""

from __future__ import annotations

import asyncpg

# Row triggers that record every change of a job (test databases only): an update of a live job,
# and a move between jobs and job_history (finishing, retry), which is a delete from one table and
# an insert into the other in one statement: the delete leaves the old row for the insert to pair.
AUDIT_SQL = """
CREATE TABLE public.job_audit (
    seq          bigserial PRIMARY KEY,
    id           bigint NOT NULL,
    old_status   text NOT NULL,
    new_status   text NOT NULL,
    old_token    uuid,
    new_token    uuid,
    old_worker   text,
    new_worker   text,
    attempts     integer NOT NULL,
    max_attempts integer NOT NULL,
    result       jsonb
);
CREATE FUNCTION public.job_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.job_audit
        (id, old_status, new_status, old_token, new_token, old_worker, new_worker, attempts, max_attempts, result)
    VALUES (NEW.id, OLD.status, NEW.status, OLD.lease_token, NEW.lease_token, OLD.worker_id, NEW.worker_id,
            NEW.attempts, NEW.max_attempts, NEW.result);
    RETURN NULL;
END;
$$;
CREATE TRIGGER job_audit AFTER UPDATE ON aiservice.jobs FOR EACH ROW EXECUTE FUNCTION public.job_audit();
CREATE TABLE public.job_audit_moving (
    id bigint NOT NULL, xact bigint NOT NULL, status text NOT NULL, lease_token uuid, worker_id text
);
CREATE FUNCTION public.job_audit_leaving() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.job_audit_moving VALUES (OLD.id, txid_current(), OLD.status, OLD.lease_token, OLD.worker_id);
    RETURN NULL;
END;
$$;
CREATE FUNCTION public.job_audit_arriving() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    m public.job_audit_moving;
BEGIN
    DELETE FROM public.job_audit_moving WHERE id = NEW.id AND xact = txid_current() RETURNING * INTO m;
    IF FOUND THEN
        INSERT INTO public.job_audit
            (id, old_status, new_status, old_token, new_token, old_worker, new_worker, attempts, max_attempts, result)
        VALUES (NEW.id, m.status, NEW.status, m.lease_token, NEW.lease_token, m.worker_id, NEW.worker_id,
                NEW.attempts, NEW.max_attempts, NEW.result);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER job_audit_leaving AFTER DELETE ON aiservice.jobs
    FOR EACH ROW EXECUTE FUNCTION public.job_audit_leaving();
CREATE TRIGGER job_audit_arriving AFTER INSERT ON aiservice.job_history
    FOR EACH ROW EXECUTE FUNCTION public.job_audit_arriving();
CREATE TRIGGER job_audit_leaving AFTER DELETE ON aiservice.job_history
    FOR EACH ROW EXECUTE FUNCTION public.job_audit_leaving();
CREATE TRIGGER job_audit_arriving AFTER INSERT ON aiservice.jobs
    FOR EACH ROW EXECUTE FUNCTION public.job_audit_arriving();
"""


async def install_audit(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(AUDIT_SQL)
    finally:
        await conn.close()


async def audit_rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT * FROM public.job_audit ORDER BY seq")
    finally:
        await conn.close()
