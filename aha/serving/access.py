"""Who may use ``aha serve``: the API key, and no state changes from other web origins.

* **API key** (``--api-key``, or the ``AHA_API_KEY`` environment variable, which keeps it out of
  the process list): every endpoint but ``/health`` then needs ``Authorization: Bearer <key>``,
  which is how OpenAI clients send their ``api_key``. A missing or wrong key gets a 401.
* **Origin.** A browser sends ``Origin`` with every POST. A POST whose ``Origin`` is not the
  server's own (scheme and ``Host``) gets a 403: a web page on another site cannot make the
  server generate, even with a "simple" cross-origin form post, which needs no CORS preflight.
  Clients that are not browsers send no ``Origin`` and are not affected.
"""

from __future__ import annotations

import ipaddress
import secrets
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from aha.serving.checks import error_response

#: The environment variable that holds the API key when ``--api-key`` is not given.
API_KEY_VARIABLE = "AHA_API_KEY"
#: Endpoints open without the API key (liveness probes).
OPEN_PATHS = ("/health",)
#: Methods that change nothing on the server.
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def access_problem(method: str, path: str, headers: Headers, api_key: str | None) -> tuple[int, str] | None:
    """``(HTTP status, message)`` refusing a request, or None to let it through (see the module docstring)."""
    if api_key is not None and path not in OPEN_PATHS:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            return 401, ("this server needs its API key: send the header `Authorization: Bearer <key>` (an OpenAI "
                         "client's api_key)")  # fmt: skip
    origin = headers.get("origin")
    if method not in SAFE_METHODS and origin is not None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or parts.netloc != headers.get("host"):
            return 403, f"cross-origin requests are refused (Origin: {origin[:100]}); call the API from a server, not a web page"
    return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (``--host``) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve beyond loopback
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a server bound to ``host`` without an API key where other machines can reach it, or None."""
    if api_key is not None or is_loopback(host):
        return None
    return (f"--host {host} lets other machines reach the server, and no API key is set: anyone who can reach it "
            f"can use it; set --api-key or {API_KEY_VARIABLE}")  # fmt: skip


class AccessChecks:
    """ASGI middleware answering the requests :func:`access_problem` refuses (OpenAI-style error body)."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = access_problem(scope["method"], scope["path"], Headers(scope=scope), self.api_key)
            if problem is not None:
                status, message = problem
                if status == 401:
                    response = error_response(status, message, "authentication_error", {"WWW-Authenticate": "Bearer"})
                else:
                    response = error_response(status, message, "permission_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
