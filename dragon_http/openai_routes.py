"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

One implementation for both runtimes: the answer comes from an ``AnswerBackend``
(``dragon_http.answer``: the cloud's ``DragonCloud`` or the device's ``EdgeRuntime``); requests
are validated by ``dragon_http.request`` before any work, with the runtime's ``RequestExtras``
for DRAGON's own fields, and refused in OpenAI's error shape (4xx, ``param`` naming the field).

Stop strings go to the backend with the other options: its answer stream applies them
(``dragon_host.answer_stream`` over ``dragon_core.text_stream``: text that could begin one is
held back until decided, and the decode is cancelled at the first), streaming or not. A prompt that cannot fit the context is refused
after being tokenised in a thread, so a large input never stalls the event loop; bodies are
capped and timed (``guard.BodyGuard``) before they are parsed. Once an answer has started, the
client closing its connection cancels it (``guard.cancel_on_disconnect``). Answers carry
DRAGON's stats in an extra field ``dragon`` (the response body, or the last streamed chunk).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import aclosing
from typing import AsyncIterator, Callable

from aiohttp import web

from dragon_core.errors import InvalidOptions
from dragon_core.prompt import last_user_message
from dragon_http import request as rq
from dragon_http.answer import Answer, AnswerBackend
from dragon_http.errors import error_response
from dragon_http.guard import CLIENT_CLOSED, DEFAULT_BODY_TIMEOUT_S, ClientGone, cancel_on_disconnect, write_within

log = logging.getLogger("dragon.http.openai")

UsageHook = Callable[[str, dict], None]  # (route path, usage) for each answer served


class OpenAIRoutes:
    def __init__(self, backend: AnswerBackend, served_model: str, *, max_tokens: int, extras: rq.RequestExtras,
                 on_usage: UsageHook | None = None, write_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        self.backend = backend
        self.served_model = served_model
        self.max_tokens = max_tokens  # the server's cap on max_tokens
        self.extras = extras
        self.on_usage = on_usage
        self.write_timeout_s = write_timeout_s
        self.created = int(time.time())

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)

    # ------------------------------------------------------------------ hooks for a runtime
    def model_list(self) -> dict:
        """The body of ``/v1/models``: OpenAI's list of one model card."""
        card = dict(id=self.served_model, object="model", created=self.created, owned_by="dragon",
                    max_model_len=self.backend.max_model_len)
        return dict(object="list", data=[card])

    def protocol_check(self, payload: dict, route: str) -> web.Response | None:
        """A further check of the validated payload (the cloud runs vLLM's own request models
        here); an error response, or None to go on."""
        return None

    # ------------------------------------------------------------------ routes
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(self.model_list())

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions")

    async def _serve(self, request: web.Request, route: str) -> web.StreamResponse:
        payload = await self._parse(request, route)
        if isinstance(payload, web.Response):
            return payload
        try:  # from here on, the client leaving cancels everything: admission wait, decode, stream
            return await cancel_on_disconnect(request, self._answer(request, payload, route,
                                                                    bool(payload.get("stream"))))
        except ClientGone:
            log.info("client went away before its answer was complete; decode cancelled")
            return error_response(CLIENT_CLOSED, "client closed the request")

    async def _answer(self, request: web.Request, payload: dict, route: str, stream: bool) -> web.StreamResponse:
        opts = rq.options(payload, self.max_tokens, self.extras)
        refusal = await self._refuse_long_prompt(payload, route, opts["max_tokens"])
        if refusal is not None:
            return refusal
        try:
            if route == "chat":
                answer = await self.backend.answer_chat(payload["messages"], **opts)
            else:
                answer = await self.backend.answer_text(payload["prompt"], **opts)
        except InvalidOptions as exc:
            return error_response(400, str(exc), param=exc.param)
        except ValueError as exc:
            return error_response(400, str(exc))
        try:
            if stream:
                return await self._stream(request, answer, chat=route == "chat")
            text = "".join([d async for d in deltas(answer)])
            self._count_usage(request, answer)
            body = self._chat_body(answer, text) if route == "chat" else self._completion_body(answer, text)
            return web.json_response(body)
        finally:
            await close_answer(answer)

    async def _refuse_long_prompt(self, payload: dict, route: str, max_tokens: int) -> web.Response | None:
        """A prompt that cannot fit the context gets its 400 here, tokenised off the event loop
        (100,000 characters take ~50 ms to tokenise, and every other client would wait): what
        reaches the backend, which tokenises on the loop, is then at most a context's worth."""
        tokenizer = getattr(self.backend, "tokenizer", None)
        if tokenizer is None:
            return None
        n = await asyncio.to_thread(_prompt_tokens, tokenizer, payload, route)
        context = self.backend.max_model_len
        if n + max_tokens > context:
            return error_response(400, f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                       f"context of {context} tokens",
                                  param="messages" if route == "chat" else "prompt")
        return None

    def _count_usage(self, request: web.Request, answer: Answer) -> None:
        if self.on_usage is not None:
            self.on_usage(request.path, answer.usage())

    # ------------------------------------------------------------------ parsing
    async def _parse(self, request: web.Request, route: str) -> dict | web.Response:
        """The validated payload, or an error response. Every answer names the field."""
        try:
            payload = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "request body is not valid JSON")
        except ValueError as exc:  # e.g. a number too long to convert
            return error_response(400, f"request body is not valid JSON: {exc}")
        if not isinstance(payload, dict):
            return error_response(400, "request body must be a JSON object")
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            return error_response(400, f"model must be a string, got {type(model).__name__}", param="model")
        if model not in (None, "", self.served_model):
            shown = model.encode("utf-8", "backslashreplace").decode("utf-8")
            return error_response(404, f"The model `{shown}` does not exist.", "NotFoundError", "model")
        try:
            rq.validate(payload, route, self.max_tokens, self.extras)
        except InvalidOptions as exc:
            return error_response(400, str(exc), param=exc.param)
        return self.protocol_check(payload, route) or payload

    # ------------------------------------------------------------------ answers
    def _chat_body(self, answer: Answer, text: str) -> dict:
        return dict(id=answer.id("chatcmpl"), object="chat.completion", created=answer.created,
                    model=self.served_model,
                    choices=[dict(index=0, message=dict(role="assistant", content=text),
                                  finish_reason=answer.finish_reason, logprobs=None)],
                    usage=answer.usage(), dragon=answer.stats())

    def _completion_body(self, answer: Answer, text: str) -> dict:
        return dict(id=answer.id("cmpl"), object="text_completion", created=answer.created,
                    model=self.served_model,
                    choices=[dict(index=0, text=text, finish_reason=answer.finish_reason, logprobs=None)],
                    usage=answer.usage(), dragon=answer.stats())

    async def _stream(self, request: web.Request, answer: Answer, chat: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        kind, obj = ("chatcmpl", "chat.completion.chunk") if chat else ("cmpl", "text_completion")
        first = True

        async def send(payload: dict) -> None:
            data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
            await write_within(resp, data, self.write_timeout_s)

        try:
            async for delta in deltas(answer):
                if chat:
                    d = {"content": delta}
                    if first:
                        d["role"], first = "assistant", False
                    choice = dict(index=0, delta=d, finish_reason=None)
                else:
                    choice = dict(index=0, text=delta, finish_reason=None)
                await send(dict(id=answer.id(kind), object=obj, created=answer.created,
                                model=self.served_model, choices=[choice]))
            last = dict(index=0, delta={}, finish_reason=answer.finish_reason) if chat else \
                dict(index=0, text="", finish_reason=answer.finish_reason)
            await send(dict(id=answer.id(kind), object=obj, created=answer.created, model=self.served_model,
                            choices=[last], usage=answer.usage(), dragon=answer.stats()))
            await write_within(resp, b"data: [DONE]\n\n", self.write_timeout_s)
            self._count_usage(request, answer)
        except (ConnectionResetError, ConnectionError, ClientGone):
            log.info("client went away mid-stream; answer cancelled")
            resp.force_close()
        finally:
            await close_answer(answer)
        return resp


_closing: set[asyncio.Task] = set()  # answers being closed, kept alive until they are


async def close_answer(answer: Answer) -> None:
    """Free the answer's streams and KV, even if this request is cancelled meanwhile: a client
    that leaves mid-stream makes the write fail (and the close start) and, a moment later, the
    disconnect watcher cancel the request, which would otherwise interrupt the close halfway
    and leave its streams open for good."""
    task = asyncio.ensure_future(answer.aclose())
    _closing.add(task)
    task.add_done_callback(_closing.discard)
    await asyncio.shield(task)


async def deltas(answer: Answer) -> AsyncIterator[str]:
    """The answer's non-empty text deltas (its stop strings already applied by the backend's
    answer stream); the backend's generator is closed however the reading ends."""
    async with aclosing(answer.deltas()) as pieces:
        async for piece in pieces:
            if piece:
                yield piece


def _prompt_tokens(tokenizer, payload: dict, route: str) -> int:
    """Tokens of the text the backend will tokenise (a thread runs this): the prompt, the last
    user message (retrieval on: the query), or the templated conversation (retrieval off)."""
    if route == "completions":
        text = payload["prompt"]
    elif payload.get("retrieval") is False:
        text = tokenizer.apply_chat_template(payload["messages"], add_generation_prompt=True, tokenize=False)
    else:
        text = last_user_message(payload["messages"])
    return len(tokenizer.encode(text, add_special_tokens=False))
