"""The one settings object, read once from the environment."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from aiservice import rules

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DURATION_FORMAT = "a number and a unit (ms, s, m, h, d), combined as in 1h30m: 500ms, 2s, 5m, 12h, 30d"
# A credential in Authorization form (RFC 7617 / RFC 6750 token68), as servers echo it in errors. Eight
# characters at least, so that "Bearer token" or 'Basic realm="x"' in a message stay readable.
_AUTH_CREDENTIAL = re.compile(r"\b(Basic|Bearer)(\s+)[A-Za-z0-9\-._~+/]{8,}=*", re.IGNORECASE)


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def parse_duration(text: str) -> timedelta:
    """Parse a Go-style duration such as ``500ms``, ``2s``, ``5m`` or ``1h30m``, plus days (``30d``)."""
    value = text.strip()
    if value == "0":
        return timedelta(0)
    pos = 0
    seconds = 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(value):
        raise ValueError(f"{text!r} is not a duration: {DURATION_FORMAT}")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [
        f"{int(days)}d" if days else "",
        f"{int(hours)}h" if hours else "",
        f"{int(minutes)}m" if minutes else "",
        f"{secs:g}s" if secs else "",
    ]
    return "".join(parts) or "0s"


def mask_url(url: str | None) -> str | None:
    """Drop the password (and any query string, which may carry keys) from a URL."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{host}" if ":" in userinfo else f"***@{host}"
        query = "***" if parts.query else ""
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "***"


def mask_url_values(url: str) -> str:
    """A URL as it may be shown: its userinfo and every query value replaced by ``***`` (the query's
    keys kept), the fragment dropped. Text that does not parse as a URL is shown as ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = "***@" + netloc.rsplit("@", 1)[1]
        query = "&".join(
            f"{pair.split('=', 1)[0]}=***" if "=" in pair else (pair and "***") for pair in parts.query.split("&")
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "***"


def redact_url(text: str, url: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` (an error message, a receiver's answer) with whatever of ``url`` may be secret masked:
    the URL itself and its query string as written shown masked, its query values, its userinfo and the
    basic credentials made of it blanked, and ``secrets`` too."""
    masked = mask_url_values(url)
    text = text.replace(url, masked)
    with contextlib.suppress(ValueError):
        parts = urlsplit(url)
        if len(parts.query) >= 3:
            text = text.replace(parts.query, urlsplit(masked).query)
        raw_values = [pair.split("=", 1)[-1] for pair in parts.query.split("&")]
        userinfo = [parts.netloc.rsplit("@", 1)[0]] if "@" in parts.netloc else []
        secrets = [*secrets, *raw_values, *userinfo, *(unquote(v) for v in raw_values + userinfo)]
    return redact(text, [*secrets, *url_secrets(url)])


def url_secrets(url: str | None) -> list[str]:
    """What in a URL may be a credential: the whole URL, its password (as written and decoded), its
    query values, and the user:password pair in the base64 form HTTP basic auth sends."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
        found = [url, *(value for _, value in parse_qsl(parts.query))]
        if parts.password is not None:
            user, password = unquote(parts.username or ""), unquote(parts.password)
            found += [parts.password, password, *_basic_credentials(user, password)]
        elif parts.username:  # a token as the only userinfo (mask_url hides it too)
            user = unquote(parts.username)
            found += [parts.username, user, *_basic_credentials(user, "")]
    except ValueError:
        found = [url]
    return [f for f in found if f]


def _basic_credentials(user: str, password: str) -> list[str]:
    # aiohttp encodes the pair as latin-1, most other clients as UTF-8.
    pair = f"{user}:{password}"
    encoded = {pair.encode()}
    with contextlib.suppress(UnicodeEncodeError):
        encoded.add(pair.encode("latin-1"))
    return [base64.b64encode(raw).decode() for raw in encoded]


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Blank out every secret (longest first, so a URL goes before the password inside it), and any
    ``Basic …`` or ``Bearer …`` credential, known or not."""
    # Very short values (a one-letter query value) would garble the message without protecting anything.
    for secret in sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return _AUTH_CREDENTIAL.sub(r"\1\2***", text)


def default_worker_id() -> str:
    # Hostname alone would collide when several workers run on one host.
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Settings:
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    database_url: str | None = field(default=None, repr=False)
    migrate_on_start: bool = True
    service_token: str | None = field(default=None, repr=False)
    llm_base_url: str | None = field(default=None, repr=False)
    llm_api_key: str | None = field(default=None, repr=False)
    llm_model: str = "qwen2.5-14b"
    llm_timeout: timedelta = timedelta(minutes=5)
    whisperx_url: str | None = field(default=None, repr=False)
    worker_id: str = field(default_factory=default_worker_id)
    worker_http_host: str = "0.0.0.0"
    worker_http_port: int = 8081
    worker_poll_interval: timedelta = timedelta(seconds=2)
    worker_claim_limit: int = 4
    worker_lease_timeout: timedelta = timedelta(minutes=15)
    # Jobs in flight per job kind, within worker_claim_limit in all. whisper-asr-webservice works one
    # request at a time, so more transcriptions would only queue there; None means worker_claim_limit.
    whisperx_concurrency: int = 1
    llm_concurrency: int | None = None
    # The AI-server sidecar (`aiservice sidecar` on the GPU host) behind /api/v1/infra/status.
    infra_sidecar_url: str | None = field(default=None, repr=False)
    infra_sidecar_token: str | None = field(default=None, repr=False)
    # Beyond the spec: operational knobs with safe defaults.
    http_max_body_bytes: int = 16 * 1024 * 1024
    # The results of dependencies one claim answers carry at most (claim_jobs_v2's bound, whose SQL
    # default is the same); the rest are left out and read with get_job when needed.
    claim_dependency_bytes: int = 8 * 1024 * 1024
    # Slow or idle clients: a request's line and headers must arrive within http_header_timeout of its
    # first byte (or of the connection's opening), its body may pause for at most http_body_timeout,
    # an idle keep-alive connection is closed after http_idle_timeout, and connections past
    # http_max_connections are answered 503 and closed at once.
    http_header_timeout: timedelta = timedelta(seconds=10)
    http_body_timeout: timedelta = timedelta(seconds=30)
    http_idle_timeout: timedelta = timedelta(seconds=75)
    http_max_connections: int = 4096
    # Result waits (POST /jobs/wait, GET /jobs/{id}?wait=) open at once: in all, and per caller (the
    # bearer token, or the client address without one). Past either: 429 too_many_waits.
    wait_max_concurrent: int = 2000
    wait_max_per_caller: int = 1000
    maintenance_interval: timedelta = timedelta(seconds=5)
    # Finished jobs older than this are deleted by the API's maintenance loop; "0" keeps them forever.
    job_retention: timedelta | None = timedelta(days=30)
    # Kubernetes sends SIGKILL 30 s after SIGTERM by default; jobs still running are handed back before.
    worker_shutdown_grace: timedelta = timedelta(seconds=25)
    whisperx_timeout: timedelta = timedelta(minutes=30)
    db_pool_max_size: int = 10
    log_level: str = "INFO"
    dev_data_dir: Path = Path(".aiservice")
    # Webhooks: a delivery is retried with backoff until this long after its event, then failed.
    webhook_max_age: timedelta = timedelta(hours=24)
    webhook_timeout: timedelta = timedelta(seconds=10)
    # Deliveries in flight per API process, in all and to one endpoint (owner_service): a slow
    # receiver holds at most its own share of the slots; each delivery is recorded when it ends.
    webhook_concurrency: int = 50
    webhook_endpoint_concurrency: int = 16
    # Behind pgbouncer in transaction pooling mode: LISTEN needs a session of its own (a direct DSN,
    # or a session-mode pool), and pooled connections must not keep named prepared statements.
    database_listen_url: str | None = field(default=None, repr=False)
    database_pgbouncer: bool = False
    # A rate_limited failure with a retry_after cools its whole model profile down for this long
    # at most (the job itself still waits the whole retry_after).
    cooldown_max: timedelta = timedelta(minutes=5)
    # How long serve, worker, migrate and dev wait at start for PostgreSQL to accept connections
    # (it may still be starting); "0" tries once. A refused password or a missing database is not waited for.
    database_connect_wait: timedelta = timedelta(seconds=30)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, defaults: Mapping[str, object] | None = None
    ) -> Settings:
        """Read every variable; ``defaults`` (by field name) replace the class defaults where a variable
        is unset, so a command can have its own (`aiservice dev` listens on 127.0.0.1)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = dict(defaults or {})
        for f in fields(cls):
            name = _ENV_NAMES.get(f.name, f.name.upper())
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = _convert(f.name, raw)
            except ValueError as exc:
                raise SettingsError(f"{name}: {exc}") from exc
        return cls(**values)  # type: ignore[arg-type]

    def require_database(self) -> str:
        if not self.database_url:
            raise SettingsError("DATABASE_URL is required (for example postgresql://user:password@host:5432/db)")
        return self.database_url

    def require_listen_database(self) -> str:
        """The DSN for LISTEN: DATABASE_LISTEN_URL, else DATABASE_URL. A transaction-mode pgbouncer
        hands each transaction to whichever server connection is free, so a LISTEN through it
        would hear nothing: behind one the session DSN must be given."""
        if self.database_listen_url:
            return self.database_listen_url
        if self.database_pgbouncer:
            raise SettingsError(
                "DATABASE_LISTEN_URL is required with DATABASE_PGBOUNCER=true: LISTEN needs a session, "
                "so point it at PostgreSQL itself (or a session-mode pool)"
            )
        return self.require_database()

    def public(self) -> dict[str, object]:
        """The effective settings with every secret masked, safe to print or serve."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            name = _ENV_NAMES.get(f.name, f.name.upper())
            if f.name in _SECRETS:
                out[name] = "***" if value else None
            elif f.name in _URLS:
                out[name] = mask_url(value)
            elif isinstance(value, timedelta):
                out[name] = format_duration(value)
            elif isinstance(value, Path):
                out[name] = str(value)
            else:
                out[name] = value
        return out


_ENV_NAMES = {
    "service_token": "AI_SERVICE_TOKEN",
    "dev_data_dir": "AISERVICE_DEV_DIR",
    "http_max_body_bytes": "HTTP_MAX_BODY_BYTES",
}
_SECRETS = {"service_token", "llm_api_key", "infra_sidecar_token"}
_URLS = {"database_url", "database_listen_url", "llm_base_url", "whisperx_url", "infra_sidecar_url"}
_POSITIVE_INTS = {"worker_claim_limit", "db_pool_max_size", "http_max_body_bytes"}
_POSITIVE_INTS |= {"whisperx_concurrency", "llm_concurrency", "claim_dependency_bytes"}
_POSITIVE_INTS |= {"webhook_concurrency", "webhook_endpoint_concurrency"}
_POSITIVE_INTS |= {"http_max_connections", "wait_max_concurrent", "wait_max_per_caller"}
_PORTS = {"http_port", "worker_http_port"}
_ZERO_ALLOWED = {"database_connect_wait"}
_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def _convert(name: str, raw: str) -> object:
    default = next(f for f in fields(Settings) if f.name == name)
    kind = default.type
    if name in _PORTS or name in _POSITIVE_INTS:
        try:
            number = int(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not an integer") from None
        if name in _PORTS and not 0 <= number <= 65535:
            raise ValueError(f"{number} is not a port number (0-65535)")
        if name in _POSITIVE_INTS and number < 1:
            raise ValueError(f"{number} must be at least 1")
        if name == "worker_claim_limit" and number > rules.CLAIM_LIMIT_MAX:
            raise ValueError(f"{number} is more than claim_jobs takes ({rules.CLAIM_LIMIT_MAX})")
        if name == "webhook_concurrency" and number > rules.CLAIM_LIMIT_MAX:
            raise ValueError(f"{number} is more than claim_deliveries takes ({rules.CLAIM_LIMIT_MAX})")
        return number
    if kind == "bool":
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"{raw!r} is not a boolean (true/false)")
    if name == "job_retention" and raw.strip() == "0":
        return None
    if name in _ZERO_ALLOWED and raw.strip() == "0":
        return timedelta(0)
    if kind in ("timedelta", "timedelta | None"):
        value = parse_duration(raw)
        if value <= timedelta(0):
            raise ValueError(f"{raw!r} must be longer than zero")
        if name == "worker_lease_timeout" and value > rules.MAX_LEASE_TIMEOUT:
            raise ValueError(f"{raw!r} is longer than claim_jobs allows ({format_duration(rules.MAX_LEASE_TIMEOUT)})")
        if name == "cooldown_max" and value > rules.MAX_COOLDOWN:
            raise ValueError(f"{raw!r} is longer than fail_job allows ({format_duration(rules.MAX_COOLDOWN)})")
        return value
    if kind == "Path":
        return Path(raw)
    if name == "log_level":
        level = raw.strip().upper()
        if level not in _LEVELS:
            raise ValueError(f"{raw!r} is not one of {', '.join(sorted(_LEVELS))}")
        return level
    if name in _URLS:
        parts = urlsplit(raw)
        if not parts.scheme or not (parts.netloc or parts.query):
            raise ValueError("is not a URL")
    return raw


def variable_name(field_name: str) -> str:
    """The environment variable that sets a Settings field."""
    return _ENV_NAMES.get(field_name, field_name.upper())
