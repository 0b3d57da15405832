"""Typed errors of the DRAGON protocol. Everything a peer can do wrong maps to one of these."""

from __future__ import annotations


class DragonError(Exception):
    """Base class of every error raised by dragon_core."""

    code: str = "dragon_error"


class InvalidDistribution(DragonError, ValueError):
    code = "invalid_distribution"


class CodecError(DragonError, ValueError):
    """A frame could not be decoded. Subclasses say why."""

    code = "codec_error"


class FrameTooLarge(CodecError):
    code = "frame_too_large"


class MalformedFrame(CodecError):
    code = "malformed_frame"


class UnsupportedVersion(CodecError):
    code = "unsupported_version"


class ProtocolError(DragonError):
    """A well-formed message arrived that the session state does not allow."""

    code = "protocol_error"


class HandshakeError(DragonError):
    """The peers cannot talk: wrong version, token, model or retriever fingerprint."""

    code = "handshake_failed"


class ModelNotInstalled(DragonError, LookupError):
    code = "model_not_installed"


class UnknownModel(DragonError, LookupError):
    code = "unknown_model"


class ConversionError(DragonError, RuntimeError):
    """A model conversion produced something that does not match its source."""


class InvalidOptions(DragonError, ValueError):
    """A request option is out of range, of the wrong type, or not supported. ``param`` names
    the offending field (as the OpenAI error shape's ``param``); the message is one line."""

    code = "invalid_options"

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------- request-level refusals on the link
# The cloud sends these as ``Error(code, message, request_id)``; the device maps the code back to
# the class with ``error_from_code`` (the SDK raises it when asked to).
class RequestRejected(DragonError):
    """An ``Open`` the cloud will not serve (an option out of its range, a request id in use)."""

    code = "request_rejected"


class QuotaExceeded(DragonError):
    """The device's identity already holds its quota of requests or streams (on any connection)."""

    code = "quota_exceeded"


class RequestIdleTimeout(DragonError):
    """The cloud waited on the device for one request longer than its idle timeout and ended it."""

    code = "request_idle_timeout"


class OutOfVocabulary(ProtocolError):
    """A peer sent a token id outside this side's vocabulary; refused before it is committed.
    On the wire it is a ``protocol_error`` (what the peer did wrong), its message says which."""


class PeerError(DragonError):
    """An error code this side has no class for; ``code`` is the peer's."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_BY_CODE = {cls.code: cls for cls in (RequestRejected, QuotaExceeded, RequestIdleTimeout, ProtocolError,
                                      InvalidDistribution)}


def error_from_code(code: str, message: str) -> DragonError:
    """The typed exception for an ``Error`` frame's code (``PeerError`` for a code we do not know)."""
    cls = _BY_CODE.get(code)
    return cls(message) if cls is not None else PeerError(code, message)
