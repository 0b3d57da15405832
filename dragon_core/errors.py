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
