from __future__ import annotations

import base64
from datetime import timedelta

import pytest

from aiservice.settings import (
    Settings,
    SettingsError,
    format_duration,
    mask_url,
    parse_duration,
    redact,
    url_secrets,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("2s", 2),
        ("5m", 300),
        ("15m", 900),
        ("1h30m", 5400),
        ("1.5s", 1.5),
        ("0", 0),
        ("250us", 0.00025),
        ("30d", 30 * 86400),
        ("1d12h", 36 * 3600),
        ("1.5d", 36 * 3600),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "5", "m", "5 m", "1x", "-2s", "2s3", "s2"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_round_trips() -> None:
    for text in ["500ms", "2s", "5m", "1h30m", "15m", "30d", "1d2h3m4s"]:
        assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)
    assert format_duration(timedelta(days=30)) == "30d"


@pytest.mark.parametrize("name", ["JOB_RETENTION", "WEBHOOK_MAX_AGE", "LLM_TIMEOUT", "WORKER_LEASE_TIMEOUT"])
def test_every_duration_setting_takes_days(name: str) -> None:
    field = name.lower()
    assert getattr(Settings.from_env({name: "2d"}), field) == timedelta(days=2)


def test_a_bad_duration_names_the_accepted_format() -> None:
    with pytest.raises(SettingsError, match=r"^JOB_RETENTION: '30 days' is not a duration: .*\b30d\b") as raised:
        Settings.from_env({"JOB_RETENTION": "30 days"})
    assert all(unit in str(raised.value) for unit in ("ms", "s", "m", "h", "d"))


def test_database_connect_wait() -> None:
    assert Settings.from_env({}).database_connect_wait == timedelta(seconds=30)
    assert Settings.from_env({"DATABASE_CONNECT_WAIT": "0"}).database_connect_wait == timedelta(0)
    assert Settings.from_env({"DATABASE_CONNECT_WAIT": "2m"}).database_connect_wait == timedelta(minutes=2)
    with pytest.raises(SettingsError, match=r"^DATABASE_CONNECT_WAIT: "):
        Settings.from_env({"DATABASE_CONNECT_WAIT": "soon"})


def test_spec_defaults() -> None:
    s = Settings.from_env({})
    assert (s.http_host, s.http_port, s.migrate_on_start) == ("0.0.0.0", 8080, True)
    assert (s.llm_model, s.llm_timeout) == ("qwen2.5-14b", timedelta(minutes=5))
    assert (s.worker_http_host, s.worker_http_port) == ("0.0.0.0", 8081)
    assert s.worker_poll_interval == timedelta(seconds=2)
    assert s.worker_claim_limit == 4
    assert s.worker_lease_timeout == timedelta(minutes=15)
    assert s.service_token is None and s.database_url is None
    assert s.worker_id


def test_environment_is_read() -> None:
    s = Settings.from_env(
        {"HTTP_PORT": "9000", "AI_SERVICE_TOKEN": "t0k", "MIGRATE_ON_START": "false", "WORKER_POLL_INTERVAL": "250ms"}
    )
    assert (s.http_port, s.service_token, s.migrate_on_start) == (9000, "t0k", False)
    assert s.worker_poll_interval == timedelta(milliseconds=250)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HTTP_PORT", "eighty"),
        ("HTTP_PORT", "70000"),
        ("WORKER_CLAIM_LIMIT", "0"),
        ("LLM_TIMEOUT", "5 minutes"),
        ("WORKER_LEASE_TIMEOUT", "0"),
        ("WORKER_LEASE_TIMEOUT", "169h"),  # claim_jobs refuses leases over 7 days
        ("WORKER_CLAIM_LIMIT", "1001"),  # and more than 1000 jobs a call
        ("MIGRATE_ON_START", "maybe"),
        ("LLM_BASE_URL", "not a url"),
        ("LOG_LEVEL", "LOUD"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"^{name}: "):
        Settings.from_env({name: value})


def test_database_url_is_required_when_asked() -> None:
    with pytest.raises(SettingsError, match="DATABASE_URL"):
        Settings.from_env({}).require_database()


def test_listen_dsn_defaults_to_database_url_unless_behind_pgbouncer() -> None:
    direct = "postgresql://app:dbpass@db:5432/ai"
    pooled = "postgresql://app:dbpass@pgbouncer:6432/ai"
    assert Settings.from_env({"DATABASE_URL": direct}).require_listen_database() == direct
    behind = {"DATABASE_URL": pooled, "DATABASE_PGBOUNCER": "true"}
    with pytest.raises(SettingsError, match="DATABASE_LISTEN_URL is required with DATABASE_PGBOUNCER"):
        Settings.from_env(behind).require_listen_database()
    s = Settings.from_env(behind | {"DATABASE_LISTEN_URL": direct})
    assert (s.database_pgbouncer, s.require_listen_database(), s.require_database()) == (True, direct, pooled)
    assert s.public()["DATABASE_LISTEN_URL"] == "postgresql://app:***@db:5432/ai"
    with pytest.raises(SettingsError, match=r"^DATABASE_PGBOUNCER: "):
        Settings.from_env({"DATABASE_PGBOUNCER": "transaction"})


def test_public_view_masks_secrets() -> None:
    s = Settings.from_env(
        {
            "AI_SERVICE_TOKEN": "service-secret",
            "LLM_API_KEY": "sk-very-secret",
            "DATABASE_URL": "postgresql://app:dbpass@db:5432/ai",
            "LLM_BASE_URL": "http://user:llmpass@llm:8000/v1?key=querysecret",
        }
    )
    text = repr(s.public()) + repr(s)
    for secret in ["service-secret", "sk-very-secret", "dbpass", "llmpass", "querysecret"]:
        assert secret not in text
    assert s.public()["AI_SERVICE_TOKEN"] == "***"
    assert s.public()["DATABASE_URL"] == "postgresql://app:***@db:5432/ai"


def test_mask_url_keeps_harmless_parts() -> None:
    assert mask_url("http://llm:8000/v1") == "http://llm:8000/v1"
    assert mask_url(None) is None


def test_url_secrets_and_redact() -> None:
    url = "http://svc:p4ssw0rd@llm:8000/v1?api_key=k3y-value&x=1"
    found = url_secrets(url)
    assert {url, "p4ssw0rd", "k3y-value"} <= set(found)
    message = f"cannot reach {url}: refused (p4ssw0rd, k3y-value)"
    cleaned = redact(message, [*found, None, "sk-secret"])
    assert "p4ssw0rd" not in cleaned and "k3y-value" not in cleaned and "llm:8000" not in cleaned
    assert cleaned.startswith("cannot reach ***: refused")
    assert url_secrets(None) == [] and redact("x=1", ["1"]) == "x=1"  # too short to blank out


def test_url_credentials_are_redacted_in_their_basic_auth_form() -> None:
    # What an HTTP client sends for http://wuser:s3cret!pw@asr:9000 (the password percent-encoded in the URL).
    url = "http://wuser:s3cret%21pw@asr:9000"
    basic = base64.b64encode(b"wuser:s3cret!pw").decode()
    found = url_secrets(url)
    assert basic in found
    for message in (f"echoed Authorization: Basic {basic}", f"credentials {basic} refused", "s3cret!pw refused"):
        cleaned = redact(message, found)
        assert basic not in cleaned and "s3cret" not in cleaned, cleaned
    # A token as the only userinfo is sent as "token:".
    assert base64.b64encode(b"tok-en123:").decode() in url_secrets("https://tok-en123@gateway/v1")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Authorization: Basic d3VzZXI6b3RoZXItcGFzc3dvcmQ= was refused", "Authorization: Basic *** was refused"),
        ("got authorization: bearer sk-someone-elses-key-123", "got authorization: bearer ***"),
        ("Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl!", "Bearer ***!"),
        ("header 'Authorization: Bearer abc/def+ghi=='", "header 'Authorization: Bearer ***'"),
        # Words after the scheme names are not credentials: the message stays readable.
        ("missing Bearer token", "missing Bearer token"),
        ('WWW-Authenticate: Basic realm="asr"', 'WWW-Authenticate: Basic realm="asr"'),
    ],
)
def test_credentials_in_authorization_form_are_redacted(message: str, expected: str) -> None:
    assert redact(message, []) == expected
