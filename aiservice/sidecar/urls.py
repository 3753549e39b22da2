"""Endpoint URLs under a configured base URL."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def join(base: str, path: str) -> str:
    """``base`` with ``path`` appended to its path; userinfo and query string are kept for the request."""
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + path, parts.query, ""))


def server_root(base: str) -> str:
    """An OpenAI-style base URL (``…/v1``) points at the API, not the server; drop that suffix."""
    parts = urlsplit(base)
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def without_userinfo(url: str) -> str:
    """``url`` without ``user:password@``, for a request whose Authorization header carries another credential."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
