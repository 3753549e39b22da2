"""The operator console: static HTML, CSS and JavaScript served by the API at /ui/.

No build step: the files in this package are served as they are. The page is open (it holds no
data); everything it shows comes from the /api/v1 routes, with the bearer token the operator types
in when AI_SERVICE_TOKEN is set. /ui/config.json tells the page whether to ask for one."""

from __future__ import annotations

import json
from importlib import resources

from aiohttp import web
from aiohttp.typedefs import Handler

PREFIX = "/ui/"
# name -> content type; only these files are served, so no request path ever reaches the filesystem.
FILES = {
    "index.html": "text/html",
    "console.css": "text/css",
    "console.js": "text/javascript",
}
CONFIG = "config.json"
# Every path the console answers, all open without the token (like the probes).
PATHS = frozenset(["/", "/ui", PREFIX, f"{PREFIX}{CONFIG}", *(f"{PREFIX}{name}" for name in FILES)])

# The page loads only its own files and talks only to its own origin; nothing inline runs.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _static(body: bytes, content_type: str) -> Handler:
    async def serve(request: web.Request) -> web.Response:
        response = web.Response(body=body, content_type=content_type, headers=SECURITY_HEADERS)
        if content_type.startswith("text/"):
            response.charset = "utf-8"
        return response

    return serve


async def _to_console(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": PREFIX})


def add_routes(router: web.UrlDispatcher, *, token_required: bool) -> None:
    """Serve the console at /ui/ (the files read once, from the installed package) and redirect / there."""
    package = resources.files(__name__)
    router.add_get("/", _to_console)
    router.add_get("/ui", _to_console)
    router.add_get(PREFIX, _static(package.joinpath("index.html").read_bytes(), FILES["index.html"]))
    for name, content_type in FILES.items():
        router.add_get(f"{PREFIX}{name}", _static(package.joinpath(name).read_bytes(), content_type))
    config = json.dumps({"token_required": token_required}).encode()
    router.add_get(f"{PREFIX}{CONFIG}", _static(config, "application/json"))
