"""Bearer-token middleware shared by the API and the sidecar."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Collection

from aiohttp import web
from aiohttp.typedefs import Middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bearer_middleware(token: str, open_paths: Collection[str], refuse: Callable[[], web.StreamResponse]) -> Middleware:
    """Require ``Authorization: Bearer <token>`` everywhere but ``open_paths``; ``refuse`` builds the 401."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in open_paths:
            # Bytes that are not UTF-8 reach us as lone surrogates; "surrogatepass" encodes any string,
            # so such a header is refused like any wrong token instead of raising.
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogatepass")
            # Constant-time: the compare must not tell how much of a guess was right.
            if not hmac.compare_digest(given, expected):
                return refuse()
        return await handler(request)

    return check_token
