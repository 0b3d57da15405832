"""The chat page at ``/``: one static file (``chat.html``), plain HTML and a little JS against
the local API. Served with a content security policy that lets it talk to this server only."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

PAGE = Path(__file__).with_name("chat.html")
# inline script and style are the page's own; nothing may be fetched from anywhere else
CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'"


def add_page(app: web.Application) -> None:
    body = PAGE.read_bytes()  # read once at start: a missing file fails the start, not a request

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

    app.router.add_get("/", page)
