"""The link handshake: what both sides must share before any request crosses (sans-I/O).

The device's first frame is a ``Hello``; the cloud answers ``Welcome`` or an ``Error`` and
closes. The two sides must run the same protocol version, the same model and tokenizer
(docs/ALGORITHMS.md §1: same vocabulary) and the same retriever and score function (§2: the
retrieval scores are compared across sides); the auth token is compared in constant time.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Mapping

from dragon_core import messages as m
from dragon_core.errors import HandshakeError

LINK_PATH = "/v1/dragon/link"  # the cloud's WebSocket endpoint for devices


@dataclass(frozen=True)
class Identity:
    """What one side runs; both sides build it from the model registry and the retriever."""

    model: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    retriever_fingerprint: str
    score_function: str

    def hello(self, auth_token: str, client: str = "") -> m.Hello:
        return m.Hello(m.PROTOCOL_VERSION, self.model, self.model_fingerprint, self.tokenizer_fingerprint,
                       self.retriever_fingerprint, self.score_function, auth_token, client)


class AuthFailed(HandshakeError):
    code = "auth_failed"


class VersionMismatch(HandshakeError):
    code = "unsupported_version"


class FingerprintMismatch(HandshakeError):
    code = "fingerprint_mismatch"


def check_hello(hello: m.Hello, ours: Identity, auth_token: str | None) -> None:
    """Raise a typed ``HandshakeError`` saying exactly what differs; return if all agree."""
    if hello.protocol_version != m.PROTOCOL_VERSION:
        raise VersionMismatch(f"protocol version {hello.protocol_version} is not supported "
                              f"(this server speaks {m.PROTOCOL_VERSION})")
    if auth_token is not None and not hmac.compare_digest(hello.auth_token.encode(), auth_token.encode()):
        raise AuthFailed("invalid auth token")
    pairs = [
        ("model", hello.model, ours.model),
        ("model fingerprint", hello.model_fingerprint, ours.model_fingerprint),
        ("tokenizer fingerprint", hello.tokenizer_fingerprint, ours.tokenizer_fingerprint),
        ("retriever fingerprint", hello.retriever_fingerprint, ours.retriever_fingerprint),
        ("score function", hello.score_function, ours.score_function),
    ]
    for what, theirs, mine in pairs:
        if theirs != mine:
            raise FingerprintMismatch(f"{what} differs: device has {theirs!r}, cloud has {mine!r}")


def match_token(presented: str, tokens: Mapping[str, str]) -> str | None:
    """The name whose token ``presented`` is (None: no one's). Every token is compared, each in
    constant time, so the time taken says nothing about which one matched or how close it was."""
    found = None
    for name, token in tokens.items():
        if hmac.compare_digest(presented.encode(), token.encode()) and found is None:
            found = name
    return found


def admit(hello: m.Hello, ours: Identity, auth_token: str | None, device_tokens: Mapping[str, str]) -> str | None:
    """The cloud's whole check of a Hello: ``HandshakeError`` saying what differs, else the name
    of the device token it presented (None: it used the shared token, or none was required).
    With named tokens and no shared token, only a named token gets in."""
    name = match_token(hello.auth_token, device_tokens) if device_tokens else None
    if name is None and device_tokens and auth_token is None:
        raise AuthFailed("invalid auth token")  # named tokens only: no shared token to fall back on
    check_hello(hello, ours, None if name else auth_token)
    return name
