"""A Python SDK shaped like the OpenAI client, so an app switches with one line:

    from dragon_edge import DragonClient
    client = DragonClient(cloud_url="http://127.0.0.1:8000", store="~/.dragon/store")
    reply = client.chat.completions.create(messages=[{"role": "user", "content": "..."}])
    print(reply.choices[0].message.content, reply.dragon["acceptance_cloud"])

``AsyncDragonClient`` is the async twin. Answers are real ``openai`` response objects
(``ChatCompletion`` / ``ChatCompletionChunk``) with one extra field, ``dragon``: per-answer stats
(acceptance rates, rollbacks, bytes, per-token latency, which side aggregated, degraded or not,
sources). Without ``cloud_url`` the client answers device-only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from openai.types.chat import ChatCompletion, ChatCompletionChunk

from dragon_core import validation as v
from dragon_core.errors import InvalidOptions, error_from_code
from dragon_core.prompt import last_user_message
from dragon_edge.runtime import EdgeRuntime, Piece, answer_options  # noqa: F401 (answer_options: re-exported)

DEFAULT_MODEL = "smollm2-135m"


class _AsyncCompletions:
    def __init__(self, client: "AsyncDragonClient") -> None:
        self._client = client

    async def create(self, *, messages: list[dict], model: str | None = None, stream: bool = False,
                     max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                     seed: int | None = None, **dragon_options: Any):
        try:
            query = v.check_text("messages", last_user_message(messages))
        except (ValueError, TypeError, AttributeError) as exc:
            if isinstance(exc, InvalidOptions):
                raise
            raise InvalidOptions("messages", str(exc)) from None
        opts = answer_options(max_tokens, temperature, top_p, seed, dragon_options)
        runtime = await self._client.runtime()
        pieces = runtime.answer(query, opts)
        if self._client.on_cloud_error == "raise":
            pieces = _raise_cloud_errors(pieces)
        model = model or self._client.model
        if stream:
            return _chunks(pieces, model)
        return await _collect(pieces, model)


async def _raise_cloud_errors(pieces: AsyncIterator[Piece]) -> AsyncIterator[Piece]:
    """The cloud's typed error for the request (``QuotaExceeded``, ``RequestIdleTimeout``, ...)
    raised where the answer would end, instead of a device-only answer flagged degraded."""
    async for piece in pieces:
        error = piece.finished.cloud_error if piece.finished else None
        if error:
            raise error_from_code(error["code"], error["message"])
        yield piece


async def _collect(pieces: AsyncIterator[Piece], model: str) -> ChatCompletion:
    text, stats = [], None
    async for piece in pieces:
        text.append(piece.text)
        stats = piece.finished or stats
    return ChatCompletion.model_validate(dict(
        id=f"chatcmpl-dragon-{uuid.uuid4().hex[:12]}", object="chat.completion", created=int(time.time()),
        model=model, choices=[dict(index=0, finish_reason=_finish(stats.finish_reason),
                                   message=dict(role="assistant", content="".join(text)))],
        usage=dict(prompt_tokens=0, completion_tokens=stats.tokens, total_tokens=stats.tokens),
        dragon=stats.as_dict()))


async def _chunks(pieces: AsyncIterator[Piece], model: str) -> AsyncIterator[ChatCompletionChunk]:
    cid, created = f"chatcmpl-dragon-{uuid.uuid4().hex[:12]}", int(time.time())
    first = True
    async for piece in pieces:
        delta: dict[str, Any] = {"content": piece.text}
        if first:
            delta["role"], first = "assistant", False
        extra = {"dragon": piece.finished.as_dict()} if piece.finished else {}
        finish = _finish(piece.finished.finish_reason) if piece.finished else None
        yield ChatCompletionChunk.model_validate(dict(
            id=cid, object="chat.completion.chunk", created=created, model=model,
            choices=[dict(index=0, delta=delta, finish_reason=finish)], **extra))


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


class _AsyncChat:
    def __init__(self, client: "AsyncDragonClient") -> None:
        self.completions = _AsyncCompletions(client)


class _AsyncDocuments:
    def __init__(self, client: "AsyncDragonClient") -> None:
        self._client = client

    async def add(self, texts: list[str] | None = None, *, path: str | Path | None = None, source: str = "sdk"):
        store = self._client.store()
        if path is not None:
            return await asyncio.to_thread(store.ingest, Path(path))
        return await asyncio.to_thread(store.add_texts, list(texts or []), source=source)

    async def delete(self, source: str):
        return await asyncio.to_thread(self._client.store().delete, source)

    async def search(self, query: str, k: int = 4):
        return await asyncio.to_thread(self._client.store().search, query, k)


class AsyncDragonClient:
    """The async SDK. ``cloud_url=None`` answers device-only."""

    def __init__(self, cloud_url: str | None = None, store: str | Path | Any | None = None, *,
                 model: str = DEFAULT_MODEL, engine: str = "llamacpp", auth_token: str = "",
                 runtime: EdgeRuntime | None = None, peer_timeout_s: float | None = None,
                 request_idle_timeout_s: float | None = None, on_cloud_error: str = "degrade") -> None:
        """``peer_timeout_s``: give the cloud up (the answer goes on device-only, flagged
        degraded) after this long without a frame from it; None: the link's default (3 s),
        <= 0: never (wait for TCP to notice). ``request_idle_timeout_s``: give one answer's cloud
        request up (device-only, degraded; the cloud is told to cancel it) when a live cloud sends
        nothing for it for this long while the device waits on it; None: the link's default
        (30 s), <= 0: never. ``on_cloud_error``: when the cloud refuses or ends a
        request with a typed error (over quota, idle timeout), "degrade" finishes the answer on the
        device (``reply.dragon["cloud_error"]`` says why), "raise" raises that error's class from
        ``dragon_core.errors`` (``QuotaExceeded``, ``RequestIdleTimeout``, ...)."""
        if on_cloud_error not in ("degrade", "raise"):
            raise InvalidOptions("on_cloud_error", f"on_cloud_error must be degrade or raise, got {on_cloud_error!r}")
        self.on_cloud_error = on_cloud_error
        self.cloud_url, self.model, self.engine_kind, self.auth_token = cloud_url, model, engine, auth_token
        self.peer_timeout_s = peer_timeout_s
        self.request_idle_timeout_s = request_idle_timeout_s
        self._store_arg = store
        self._store = None
        self._runtime = runtime
        self._lock = asyncio.Lock()
        self.chat = _AsyncChat(self)
        self.documents = _AsyncDocuments(self)

    def store(self):
        if self._store is None:
            if self._store_arg is None:
                raise ValueError("this client has no document store (pass store=PATH)")
            if isinstance(self._store_arg, (str, Path)):
                from dragon_edge.store import DocumentStore

                self._store = DocumentStore(Path(self._store_arg).expanduser())
            else:
                self._store = self._store_arg
        return self._store

    async def runtime(self) -> EdgeRuntime:
        async with self._lock:
            if self._runtime is None:
                from dragon_edge.loader import load_runtime

                store = self.store() if self._store_arg is not None else None
                self._runtime = await asyncio.to_thread(
                    load_runtime, self.model, self.engine_kind, store, self.cloud_url, self.auth_token)
                link = self._runtime.link
                if link is not None and self.peer_timeout_s is not None:
                    link.options = dataclasses.replace(link.options, peer_timeout_s=self.peer_timeout_s)
                if link is not None and self.request_idle_timeout_s is not None:
                    link.options = dataclasses.replace(link.options, request_idle_timeout_s=self.request_idle_timeout_s)
            return self._runtime

    async def close(self) -> None:
        if self._runtime is not None:
            await self._runtime.close()

    async def __aenter__(self) -> "AsyncDragonClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


# ---------------------------------------------------------------------------- the sync twin
class _LoopThread:
    """A private event loop in a daemon thread, so sync callers can use the async core."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dragon-sdk", daemon=True)
        self.thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def iterate(self, agen: AsyncIterator) -> Iterator:
        while True:
            try:
                yield self.run(agen.__anext__())
            except StopAsyncIteration:
                return


class _Completions:
    def __init__(self, client: "DragonClient") -> None:
        self._client = client

    def create(self, **kwargs: Any):
        result = self._client._loop.run(self._client._async.chat.completions.create(**kwargs))
        if kwargs.get("stream"):
            return self._client._loop.iterate(result)
        return result


class _Chat:
    def __init__(self, client: "DragonClient") -> None:
        self.completions = _Completions(client)


class _Documents:
    def __init__(self, client: "DragonClient") -> None:
        self._client = client

    def add(self, texts: list[str] | None = None, **kw):
        return self._client._loop.run(self._client._async.documents.add(texts, **kw))

    def delete(self, source: str):
        return self._client._loop.run(self._client._async.documents.delete(source))

    def search(self, query: str, k: int = 4):
        return self._client._loop.run(self._client._async.documents.search(query, k))


class DragonClient:
    """The sync SDK (same arguments as ``AsyncDragonClient``)."""

    def __init__(self, cloud_url: str | None = None, store: str | Path | Any | None = None, **kwargs: Any) -> None:
        self._loop = _LoopThread()
        self._async = self._loop.run(_make_async(cloud_url, store, kwargs))
        self.chat = _Chat(self)
        self.documents = _Documents(self)

    def close(self) -> None:
        self._loop.run(self._async.close())
        self._loop.loop.call_soon_threadsafe(self._loop.loop.stop)

    def __enter__(self) -> "DragonClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def _make_async(cloud_url, store, kwargs) -> AsyncDragonClient:
    return AsyncDragonClient(cloud_url, store, **kwargs)  # its asyncio.Lock belongs to the SDK loop
