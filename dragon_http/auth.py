"""API keys for the HTTP routes, checked as vLLM's OpenAI server checks them.

A request to a protected route must carry ``Authorization: Bearer <key>`` with one of the
server's keys; anything else gets a 401 in OpenAI's error shape (the ``openai`` package raises
``AuthenticationError`` on it). Protected: the OpenAI routes (``/v1/...``), and with
``protect_probes`` also ``/health`` and ``/metrics``. The device link (``/v1/dragon/link``) is
not: it authenticates in its own handshake (``--auth-token``).

Keys are compared in constant time (their SHA-256 digests, so that neither the key's content
nor its length leaks through timing), and every key is compared (no early exit on a match).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Awaitable, Callable, Iterable

from aiohttp import web

from dragon_core.handshake import LINK_PATH
from dragon_http.errors import error_response

PROBES = ("/health", "/metrics")
ENV_KEY = "DRAGON_API_KEY"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def load_api_keys(keys: Iterable[str] = (), key_file: Path | None = None, env: dict | None = None,
                  env_key: str = ENV_KEY) -> list[str]:
    """The server's keys: ``--api-key`` values, one key per non-empty line of ``--api-key-file``
    (``#`` starts a comment), and the environment variable ``env_key`` (the cloud's
    ``DRAGON_API_KEY``; the device's server reads its own). Empty: no key, the routes are open."""
    env = os.environ if env is None else env
    found = [k.strip() for k in keys if k and k.strip()]
    if key_file is not None:
        lines = key_file.read_text(encoding="utf-8").splitlines()
        found += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if env.get(env_key, "").strip():
        found.append(env[env_key].strip())
    return list(dict.fromkeys(found))


class ApiKeyCheck:
    def __init__(self, keys: Iterable[str], protect_probes: bool = False) -> None:
        self._digests = [_digest(k) for k in keys]
        if not self._digests:
            raise ValueError("ApiKeyCheck needs at least one key")
        self.protect_probes = protect_probes

    def protects(self, request: web.Request) -> bool:
        path = request.path
        if request.method == "OPTIONS" or path == LINK_PATH:  # CORS preflight; the link has its own token
            return False
        return path.startswith("/v1/") or path == "/v1" or (self.protect_probes and path in PROBES)

    def accepts(self, authorization: str | None) -> bool:
        scheme, _, presented = (authorization or "").partition(" ")
        given = _digest(presented.strip())
        matched = False
        for digest in self._digests:  # compare with every key: the time does not say which matched
            matched |= hmac.compare_digest(given, digest)
        return matched and scheme.lower() == "bearer"

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.protects(request) and not self.accepts(request.headers.get("Authorization")):
            resp = error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                  "authentication_error")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="dragon"'
            return resp
        return await handler(request)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
