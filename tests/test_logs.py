from __future__ import annotations

import json
import logging

from aiservice.logs import JsonFormatter


def record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("aiservice.worker", logging.INFO, __file__, 1, "job %s done", (7,), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_one_json_object_per_line_with_context() -> None:
    line = JsonFormatter().format(record(job_id=7, task_type="llm_chat", worker_id="w1", duration_ms=12.5))
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["msg"] == "job 7 done" and doc["level"] == "info" and doc["logger"] == "aiservice.worker"
    assert (doc["job_id"], doc["task_type"], doc["worker_id"], doc["duration_ms"]) == (7, "llm_chat", "w1", 12.5)


def test_unlisted_attributes_are_not_emitted() -> None:
    doc = json.loads(JsonFormatter().format(record(input={"user": "private"}, api_key="sk-secret")))
    assert "private" not in json.dumps(doc) and "sk-secret" not in json.dumps(doc)


def test_exceptions_are_kept_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = record()
        rec.exc_info = sys.exc_info()
    line = JsonFormatter().format(rec)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exc"]
