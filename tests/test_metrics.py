"""/metrics on the API: open like the probes, parseable, bounded labels."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from aiservice import metrics
from aiservice.db.store import JobStore

TOKEN = "metrics-test-token"


def samples(text: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(found: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(s.value for s in found.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


async def test_metrics_are_open_and_parse(api_factory: Any) -> None:
    api = await api_factory(service_token=TOKEN)
    response = await api.get("/metrics")
    assert response.status == 200
    families = {f.name for f in text_string_to_metric_families(await response.text())}
    for name in ("aiservice_http_requests", "aiservice_jobs_created", "aiservice_queue_jobs", "process_cpu_seconds"):
        assert name in families


async def test_requests_and_creations_are_counted_by_route_template(api: Any, store: JobStore) -> None:
    before = samples(await (await api.get("/metrics")).text())
    body = {"owner_service": "t", "owner_ref": "r1", "task_type": "metric_task", "model_profile": "m"}
    created = await (await api.post("/api/v1/jobs", json=body)).json()
    await api.post("/api/v1/jobs", json=body | {"owner_ref": "r2", "idempotency_key": "k"})
    await api.post("/api/v1/jobs", json=body | {"owner_ref": "r2", "idempotency_key": "k"})  # a repeat: no job
    await api.get(f"/api/v1/jobs/{created['id']}")
    await api.get("/api/v1/jobs/999999")
    metrics.refresh_queue(await store.stats())  # what the maintenance loop does every few seconds
    after = samples(await (await api.get("/metrics")).text())

    created_total = "aiservice_jobs_created_total"
    assert (
        value(after, created_total, task_type="metric_task") - value(before, created_total, task_type="metric_task")
        == 2
    )
    requests = "aiservice_http_requests_total"
    route = "/api/v1/jobs/{id}"
    assert value(after, requests, route=route, status="200") - value(before, requests, route=route, status="200") == 1
    assert value(after, requests, route=route, status="404") - value(before, requests, route=route, status="404") == 1
    await api.get("/no/such/path/123")
    after = samples(await (await api.get("/metrics")).text())
    templates = {r.canonical for r in api.server.app.router.resources()} | {"unmatched"}
    routes = {s.labels["route"] for s in after[requests]}
    assert routes <= templates, "raw paths (with ids) must never be labels"
    assert "unmatched" in routes


async def test_jobs_created_through_sql_are_counted_too(api: Any, store: JobStore, conn: Any) -> None:
    """aiservice_jobs_created_total counts every job the database holds a creation of, whichever
    door it came through, with bounded labels; deleting jobs never lowers it."""
    before = samples(await (await api.get("/metrics")).text())
    body = {"owner_service": "t", "owner_ref": "http", "task_type": "door_task", "model_profile": "dm"}
    assert (await api.post("/api/v1/jobs", json=body)).status == 201
    await conn.execute("SELECT (r.job).id FROM aiservice.create_job('t', 'sql', 'door_task', 'dm') r")
    await conn.execute(
        "SELECT (r.job).id FROM aiservice.create_jobs($1, $2) r",
        [{"owner_ref": "a"}, {"owner_ref": "b"}],
        {"owner_service": "t", "task_type": "door_task", "model_profile": "dm"},
    )
    metrics.refresh_queue(await store.stats())
    after = samples(await (await api.get("/metrics")).text())
    name = "aiservice_jobs_created_total"
    labels = {"task_type": "door_task", "model_profile": "dm"}
    assert value(after, name, **labels) - value(before, name, **labels) == 4

    # Counters folded, then every job deleted (retention): the total stays.
    await store.compact_counts()
    await conn.execute("DELETE FROM aiservice.jobs")
    await conn.execute("DELETE FROM aiservice.job_history")
    metrics.refresh_queue(await store.stats())
    after = samples(await (await api.get("/metrics")).text())
    assert value(after, name, **labels) - value(before, name, **labels) == 4
    assert [(c.task_type, c.model_profile, c.count) for c in (await store.stats()).created] == [("door_task", "dm", 4)]


async def test_queue_gauges_follow_sql(store: JobStore, job_factory: Any) -> None:
    await job_factory(task_type="gauge_task", model_profile="gm")
    await job_factory(task_type="gauge_task", model_profile="gm")
    metrics.refresh_queue(await store.stats())
    gauge = metrics.QUEUE_JOBS.labels("gauge_task", "gm", "pending")
    assert gauge._value.get() == 2
    assert metrics.OLDEST_PENDING.labels("gauge_task")._value.get() >= 0


async def test_limit_gauges_follow_sql(store: JobStore, job_factory: Any) -> None:
    await job_factory(model_profile="gm")
    await store.set_limit("model_profile", "gm", {"max_running": 3, "paused": True})
    metrics.refresh_queue(await store.stats())
    assert metrics.LIMIT_USAGE.labels("model_profile", "gm", "max_running")._value.get() == 3
    assert metrics.LIMIT_USAGE.labels("model_profile", "gm", "paused")._value.get() == 1
    assert metrics.LIMIT_USAGE.labels("model_profile", "gm", "running")._value.get() == 0


def label_values(found: dict[str, list[Any]], label: str, *names: str) -> set[str]:
    return {s.labels[label] for name in names for s in found.get(name, []) if label in s.labels}


async def test_caller_chosen_labels_stay_bounded(api: Any, store: JobStore) -> None:
    before = await (await api.get("/metrics")).text()
    # One batch of 5,000 jobs, each of its own task type and profile.
    jobs = [{"owner_ref": f"flood/{i}", "task_type": f"flood_{i}", "model_profile": f"p_{i}"} for i in range(5000)]
    response = await api.post("/api/v1/jobs/batch", json={"defaults": {"owner_service": "flood"}, "jobs": jobs})
    assert response.status == 201, await response.text()
    metrics.refresh_queue(await store.stats())  # what the maintenance loop does every few seconds
    known = await api.post(
        "/api/v1/jobs", json={**jobs[0], "owner_service": "t", "owner_ref": "x", "task_type": "llm_chat"}
    )
    assert known.status == 201
    metrics.refresh_queue(await store.stats())

    text = await (await api.get("/metrics")).text()
    found = samples(text)
    names = ("aiservice_jobs_created_total", "aiservice_queue_jobs", "aiservice_oldest_pending_age_seconds")
    task_types = label_values(found, "task_type", *names)
    profiles = label_values(found, "model_profile", *names)
    assert "other" in task_types and "other" in profiles
    assert {"flood_0", "llm_chat"} <= task_types  # the first values seen and the built-in types keep their own
    # The registry is the process's: series of earlier tests stay. Count what this batch added.
    assert len({t for t in task_types if t.startswith("flood_")}) == metrics.LABEL_VALUE_LIMIT
    assert len({p for p in profiles if p.startswith("p_")}) <= metrics.LABEL_VALUE_LIMIT
    # Nothing is lost: the rest is counted under "other".
    created = "aiservice_jobs_created_total"
    assert value(found, created) - value(samples(before), created) == 5001
    assert len(text) < len(before) + 100_000, f"/metrics grew from {len(before)} to {len(text)} bytes"
