"""OpenAI's error shape, for every HTTP refusal of both servers (the cloud's and the device's
``dragon-edge serve``: the routes, auth, body guards), so that the ``openai`` package raises its
typed errors (``BadRequestError``, ``AuthenticationError``...)."""

from __future__ import annotations

from aiohttp import web


def error_response(status: int, message: str, err_type: str = "invalid_request_error",
                   param: str | None = None) -> web.Response:
    """``{"error": {"message", "type", "param", "code"}}`` with HTTP ``status``."""
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return web.json_response(body, status=status)
