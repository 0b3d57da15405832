"""Keeping a loopback server local: its address, and the browser's view of it.

A server bound to loopback is reachable only from this machine, but a web page the user visits
runs on this machine too. Two browser tricks would reach it anyway, and ``LocalOnly`` closes both:

* **DNS rebinding**: a page from ``evil.example`` re-resolves its own name to 127.0.0.1 and
  reads the answers as same-origin. The request's ``Host`` then names ``evil.example``: on a
  loopback server only a loopback ``Host`` (``localhost``, ``127.0.0.1``, ``[::1]``) is served.
* **Cross-site requests**: any page can send a "simple" POST (no preflight) to localhost; it
  cannot read the answer, but it could make the server act (ingest a folder). A browser names
  the page's origin in ``Origin``: a request whose ``Origin`` is not the server itself is refused.

Clients that are not browsers (curl, the ``openai`` package, apps) send no ``Origin`` and a
loopback ``Host``, and are not affected.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from dragon_http.errors import error_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    """True iff every address ``host`` names is a loopback address. Wildcards (``0.0.0.0``,
    ``::``, ``""``) and names that do not resolve count as exposed."""
    host = host.strip().strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host.lower() == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    addrs = {info[4][0].split("%")[0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)


def _literal_loopback(hostname: str) -> bool:
    """A loopback name without asking DNS (a rebinding name resolves to 127.0.0.1 too)."""
    hostname = hostname.strip("[]").lower()
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


class LocalOnly:
    """Middleware: ``loopback_host`` (the server is bound to loopback) serves only loopback
    ``Host`` headers; every request from a browser page of another origin gets a 403."""

    def __init__(self, loopback_host: bool) -> None:
        self.loopback_host = loopback_host

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        hostname = urlsplit("//" + (request.host or "")).hostname or ""
        if self.loopback_host and not _literal_loopback(hostname):
            return error_response(403, f"Host {request.host!r} is not this loopback server (DNS rebinding?); "
                                       "use http://127.0.0.1:PORT or http://localhost:PORT", "permission_error")
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc.lower() != request.host.lower():
            return error_response(403, f"requests from the web page {origin!r} are refused: the server serves "
                                       "its own page and non-browser clients only", "permission_error")
        return await handler(request)
