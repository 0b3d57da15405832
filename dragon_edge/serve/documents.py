"""The private store over HTTP, for apps that manage documents (under ``/v1``: the API key,
when the server has one, protects them as it protects the answers).

* ``POST /v1/dragon/documents`` ``{"path": "/abs/file-or-folder"}`` ingests a file or a folder
  (options ``prune``, ``max_file_mb``, ``follow_symlinks``, as ``dragon-edge ingest``), or
  ``{"text": "..." | [...], "source": "name"}`` adds text; the answer is the ingest report
  (skipped entries with their reasons).
* ``GET /v1/dragon/documents``: the sources and the store's size.
* ``DELETE /v1/dragon/documents?source=S``: one source (a file path or a text source's name).
  A folder path removes every file under it only with ``&folder=true`` (the CLI asks first);
  emptying the store needs ``?all=true`` (the CLI's ``--all``).

The server reads files by path on its own machine: the path is the device's, never uploaded
content. Store errors are typed (``dragon_edge.store.errors``) and answered in OpenAI's error
shape with a status that says whose fault it is (400 a bad path, 404 no such source, 409 needs
confirmation, 507 disk full).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Callable

from aiohttp import web

from dragon_core import validation as v
from dragon_core.errors import InvalidOptions
from dragon_edge.store import DocumentStore, IngestReport
from dragon_edge.store.errors import (DocumentError, EmptyFolder, FolderNotFound, StoreError, StoreFull,
                                      UnknownSource, WouldDeleteEverything)
from dragon_edge.store.names import names_one_source
from dragon_edge.store.readers import DEFAULT_MAX_FILE_BYTES
from dragon_http.errors import error_response

PATH = "/v1/dragon/documents"
MAX_FILE_MB_CAP = 1 << 20  # a bound on the type (1 TiB); the disk bounds it further

_STATUS: list[tuple[type[StoreError], int]] = [
    (UnknownSource, 404), (WouldDeleteEverything, 409), (StoreFull, 507),
    (FolderNotFound, 400), (EmptyFolder, 400), (DocumentError, 400),
]


class DocumentRoutes:
    def __init__(self, store: DocumentStore) -> None:
        self.store = store

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(PATH, self.list)
        app.router.add_post(PATH, self.add)
        app.router.add_delete(PATH, self.delete)

    async def list(self, request: web.Request) -> web.Response:
        sources = await asyncio.to_thread(self.store.sources)
        return web.json_response(dict(object="list", data=[dict(source=s) for s in sources],
                                      store=await self._summary()))

    async def add(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "request body is not valid JSON")
        try:
            work = self._ingest_call(body)
        except InvalidOptions as exc:
            return error_response(400, str(exc), param=exc.param)
        result = await self._run(work)
        if isinstance(result, web.Response):
            return result
        report = result if isinstance(result, IngestReport) else IngestReport(passages_added=result)
        return web.json_response(dict(object="dragon.ingest", **_report(report), store=await self._summary()))

    async def delete(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            everything, folder = _flag(q, "all"), _flag(q, "folder")
        except InvalidOptions as exc:
            return error_response(400, str(exc), param=exc.param)
        source = q.get("source")
        if everything == (source is not None):
            return error_response(400, "name one source (?source=...) or empty the store with ?all=true",
                                  param="source")
        result = await self._run(self.store.delete_all if everything else lambda: self._delete(source, folder))
        if isinstance(result, web.Response):
            return result
        return web.json_response(dict(object="dragon.delete", passages_removed=result, store=await self._summary()))

    # ------------------------------------------------------------------ helpers
    def _ingest_call(self, body: Any) -> Callable[[], Any]:
        """What to run for a POST body (validated here, before any work)."""
        if not isinstance(body, dict):
            raise InvalidOptions(None, "request body must be a JSON object")
        unknown = set(body) - {"path", "prune", "max_file_mb", "follow_symlinks", "text", "source"}
        if unknown:
            raise InvalidOptions(sorted(unknown)[0], f"unsupported field(s): {sorted(unknown)}")
        if ("path" in body) == ("text" in body):
            raise InvalidOptions("path", "give a file or folder \"path\", or \"text\" (with an optional \"source\")")
        if "text" in body:
            texts = body["text"] if isinstance(body["text"], list) else [body["text"]]
            for text in texts:
                v.check_text("text", text, max_chars=1 << 26)
            source = body.get("source")
            if source is not None:
                v.check_text("source", source, max_chars=4096)
            return lambda: self.store.add_texts(texts, source=source)
        path = v.check_text("path", body["path"], max_chars=4096)
        if not os.path.isabs(path):
            raise InvalidOptions("path", f"path must be absolute (the server's working directory is not the "
                                         f"app's), got {path!r}")
        max_mb = v.check_number("max_file_mb", body.get("max_file_mb", DEFAULT_MAX_FILE_BYTES / 2**20))
        if not 0 < max_mb <= MAX_FILE_MB_CAP:
            raise InvalidOptions("max_file_mb", f"max_file_mb must be in (0, {MAX_FILE_MB_CAP}]")
        flags = {name: _bool(body, name) for name in ("prune", "follow_symlinks")}
        max_bytes = int(max_mb * 2**20)
        if os.path.isdir(path):
            return lambda: self.store.ingest(path, progress=False, max_file_bytes=max_bytes, **flags)
        if os.path.lexists(path):
            return lambda: self.store.add_file(path, max_file_bytes=max_bytes)
        raise InvalidOptions("path", f"{path}: no such file or folder on the device")

    def _delete(self, source: str, folder: bool) -> int:
        keys = self.store.sources_matching(source)
        if keys and not names_one_source(keys, source):
            if len(keys) == len(self.store.sources()):
                raise WouldDeleteEverything(f"{source} is a folder holding every source in the store "
                                            f"({len(keys)}); to empty the store, use ?all=true")
            if not folder:
                raise WouldDeleteEverything(f"{source} is not a source but a folder holding {len(keys)} sources "
                                            f"(e.g. {keys[0]}); add &folder=true to delete them all")
        return self.store.delete(source)

    async def _run(self, work: Callable[[], Any]) -> Any:
        """``work()`` in a thread (embedding and SQLite block); a store error as its response."""
        try:
            return await asyncio.to_thread(work)
        except StoreError as exc:
            status = next((code for cls, code in _STATUS if isinstance(exc, cls)), 500)
            return error_response(status, " ".join(str(exc).split()), exc.code,
                                  param="path" if status == 400 else None)

    async def _summary(self) -> dict:
        st = await asyncio.to_thread(self.store.stats)
        return dict(path=st.path, sources=st.sources, passages=st.passages, staged_documents=st.staged_documents)


def _report(r: IngestReport) -> dict:
    return dict(added=r.added, updated=r.updated, unchanged=r.unchanged, removed=r.removed,
                skipped=[dict(path=p, reason=why) for p, why in r.skipped], resumed=r.resumed,
                passages_added=r.passages_added, passages_removed=r.passages_removed, seconds=round(r.seconds, 3))


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise InvalidOptions(name, f"{name} must be true or false")
    return value


def _flag(query, name: str) -> bool:
    value = query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise InvalidOptions(name, f"{name} must be true or false")
    return value in ("true", "1")
