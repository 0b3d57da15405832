"""Nothing an HTTP client does can hold a server's resources forever (the cloud's and the device's).

* **Headers**: aiohttp closes a connection whose request line and headers have not all arrived
  ``keepalive_timeout`` after it opened (or after its previous answer); ``dragon-cloud serve``
  (and ``dragon-edge serve``) set it from ``--header-timeout-s`` (``web.run_app(keepalive_timeout=...)``).
* **Body** (``BodyGuard``): a body larger than the cap is refused (413) before it is read, from
  its ``Content-Length``, or as soon as a chunked one passes the cap; a body that has not fully
  arrived within ``body_timeout_s`` gets a 408. Both in OpenAI's error shape.
* **The client leaving** (``cancel_on_disconnect``): the work of a request (waiting for
  admission, decoding, streaming) is cancelled as soon as its connection closes, streaming or
  not; aiohttp itself would let a non-streaming handler decode to the end for nobody.
* **A client that stops reading** (``write_within``): a streamed answer whose socket buffer
  stays full for ``body_timeout_s`` is ended, its streams freed.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, TypeVar

from aiohttp import web

from dragon_http.errors import error_response

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_HEADER_TIMEOUT_S = 15.0
DEFAULT_BODY_TIMEOUT_S = 30.0
# 100,000 characters of prompt (validation.MAX_QUERY_CHARS) JSON-escaped as \uXXXX are 600 kB;
# a few such messages fit, a flood of megabytes does not.
DEFAULT_MAX_BODY_BYTES = 2 << 20
DISCONNECT_POLL_S = 0.1  # how soon a departed client's decode stops
CLIENT_CLOSED = 499  # nginx's status for "the client closed the request", for logs and metrics


class ClientGone(Exception):
    """The client closed its connection before its answer was complete."""


class BodyGuard:
    """Reads a request's body under a size cap and a deadline, before the handler runs."""

    def __init__(self, timeout_s: float = DEFAULT_BODY_TIMEOUT_S, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.timeout_s, self.max_bytes = timeout_s, max_bytes

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.body_exists:
            return await handler(request)
        if (request.content_length or 0) > self.max_bytes:
            return _closing(error_response(413, f"request body is {request.content_length} bytes, more than "
                                                f"the limit of {self.max_bytes}"))
        try:
            async with asyncio.timeout(self.timeout_s):
                await _read_capped(request, self.max_bytes)
        except TimeoutError:
            return _closing(error_response(408, f"request body not received within {self.timeout_s:g} s"))
        except web.HTTPRequestEntityTooLarge:
            return _closing(error_response(413, f"request body is more than the limit of {self.max_bytes} bytes"))
        return await handler(request)


async def _read_capped(request: web.Request, max_bytes: int) -> None:
    """Reads the whole body into the request (``request.json()`` then reuses it), refusing it as
    soon as it passes ``max_bytes`` (a chunked body has no length to check up front)."""
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > max_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=size)
        chunks.append(chunk)
    request._read_bytes = b"".join(chunks)  # aiohttp's own cache of the body (what request.read() fills)


def _closing(resp: web.Response) -> web.Response:
    # the unread rest of the body would otherwise be drained before the next request on the connection
    resp.force_close()
    return resp


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def cancel_on_disconnect(request: web.Request, work: Awaitable[T]) -> T:
    """``await work``, cancelled (and ``ClientGone`` raised) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if client_gone(request):
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def write_within(resp: web.StreamResponse, data: bytes, timeout_s: float) -> None:
    """One write of a streamed answer; a reader that takes no data for ``timeout_s`` is gone."""
    try:
        async with asyncio.timeout(timeout_s):
            await resp.write(data)
    except TimeoutError:
        raise ClientGone() from None
