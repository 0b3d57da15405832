"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Requests are parsed and validated with vLLM's own OpenAI protocol models and answered in
OpenAI's shapes (errors included). Each answer is cloud-side RAG with output aggregation: the
top-k public passages, one vLLM stream per passage, mixed by retrieval score (a solo cloud
``Session``: the same code path as DRAGON, with no device). Two extra request fields:
``k`` (passages, default from the server) and ``retrieval`` (false: a plain model server).

Every field is validated before any work (``dragon_core.validation``, the rules the link and
the device share): out-of-range, wrong-typed or non-UTF-8 values, and any OpenAI option we do
not implement (``logprobs``, ``tools``, ``response_format``, penalties, ...), get a 400 in
OpenAI's error shape with ``param`` naming the field; nothing is silently ignored. An option at
its neutral value (``logprobs: false``, ``presence_penalty: 0``, ``n: 1``...) is accepted.

Stop strings never leak a partial match (``dragon_core.stop_text``: text that could begin one
is held back until decided), streaming or not. A prompt that cannot fit the context is refused
after being tokenised in a thread, so a large input never stalls the event loop; bodies are
capped and timed (``http_guard.BodyGuard``) before they are parsed. Once an answer has started,
the client closing its connection cancels it (``http_guard.cancel_on_disconnect``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing
from typing import Any, AsyncIterator

from aiohttp import web
from pydantic import ValidationError

from dragon_core import stop_text
from dragon_core import validation as v
from dragon_core.errors import InvalidOptions
from dragon_core.prompt import last_user_message
from dragon_vllm import vllm_compat as vc
from dragon_vllm.backend import CloudAnswer, DragonCloud
from dragon_vllm.http_guard import CLIENT_CLOSED, DEFAULT_BODY_TIMEOUT_S, ClientGone, cancel_on_disconnect, write_within
from dragon_vllm.metrics import CloudMetrics
from dragon_vllm.openai_errors import error_response

# Options we implement, per route (``k`` and ``retrieval`` are DRAGON's extra fields; ``user``
# is metadata; ``stream_options``: the last chunk always carries ``usage``).
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream",
           "stream_options", "user", "k", "retrieval"}
SUPPORTED = {"chat": _COMMON | {"messages", "max_completion_tokens"}, "completions": _COMMON | {"prompt"}}
# Options we do not implement, accepted only at a value that changes nothing.
NEUTRAL: dict[str, tuple] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True, False), "response_format": (None, {"type": "text"}), "echo": (None, False),
    "best_of": (None, 1), "suffix": (None, ""), "min_tokens": (None, 0), "min_p": (None, 0),
    "stop_token_ids": (None, []), "ignore_eos": (None, False), "add_generation_prompt": (None, True),
    "skip_special_tokens": (None, True), "use_beam_search": (None, False), "prompt_logprobs": (None,),
    "metadata": (None, {}), "store": (None, False), "service_tier": (None, "auto", "default"),
}
MAX_STOP = 4  # OpenAI's own limit on stop sequences
DEFAULT_MAX_TOKENS = 128

log = logging.getLogger("dragon.cloud.api")


class OpenAIRoutes:
    def __init__(self, cloud: DragonCloud, served_model: str, *, max_tokens: int | None = None,
                 max_k: int | None = None, metrics: CloudMetrics | None = None,
                 write_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        from dragon_vllm.link import LinkLimits

        self.cloud = cloud
        self.served_model = served_model
        # the server's caps: the link's by default (the context length bounds max_tokens further)
        self.max_tokens = max_tokens or min(LinkLimits().max_tokens, max(1, cloud.max_model_len - 1))
        self.max_k = max_k or LinkLimits().max_k
        self.metrics = metrics
        self.write_timeout_s = write_timeout_s

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)

    # ------------------------------------------------------------------ routes
    async def models(self, request: web.Request) -> web.Response:
        card = vc.ModelCard(id=self.served_model, owned_by="dragon", max_model_len=self.cloud.max_model_len)
        return web.json_response(vc.ModelList(data=[card]).model_dump())

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, vc.ChatCompletionRequest, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, vc.CompletionRequest, "completions")

    async def _serve(self, request: web.Request, model_cls, route: str) -> web.StreamResponse:
        parsed = await self._parse(request, model_cls, route)
        if isinstance(parsed, web.Response):
            return parsed
        payload, req = parsed
        try:  # from here on, the client leaving cancels everything: admission wait, decode, stream
            return await cancel_on_disconnect(request, self._answer(request, payload, route, bool(req.stream)))
        except ClientGone:
            log.info("client went away before its answer was complete; decode cancelled")
            return error_response(CLIENT_CLOSED, "client closed the request")

    async def _answer(self, request: web.Request, payload: dict, route: str, stream: bool) -> web.StreamResponse:
        opts = self._options(payload)
        stops = opts.pop("stop")  # applied here, with hold-back (stop_text), not by the backend
        refusal = await self._refuse_long_prompt(payload, route, opts["max_tokens"])
        if refusal is not None:
            return refusal
        try:
            if route == "chat":
                answer = await self.cloud.answer_chat(payload["messages"], stop=[], **opts)
            else:
                answer = await self.cloud.answer_text(payload["prompt"], stop=[], **opts)
        except InvalidOptions as exc:
            return error_response(400, str(exc), param=exc.param)
        except ValueError as exc:
            return error_response(400, str(exc))
        try:
            if stream:
                return await self._stream(request, answer, stops, chat=route == "chat")
            text = "".join([d async for d in visible_deltas(answer, stops)])
            self._count_usage(request, answer)
            body = self._chat_body(answer, text) if route == "chat" else self._completion_body(answer, text)
            return web.json_response(body)
        finally:
            await close_answer(answer)

    async def _refuse_long_prompt(self, payload: dict, route: str, max_tokens: int) -> web.Response | None:
        """A prompt that cannot fit the context gets its 400 here, tokenised off the event loop
        (100,000 characters take ~50 ms to tokenise, and every other client would wait): what
        reaches the backend, which tokenises on the loop, is then at most a context's worth."""
        tokenizer = getattr(self.cloud, "tokenizer", None)
        if tokenizer is None:
            return None
        n = await asyncio.to_thread(_prompt_tokens, tokenizer, payload, route)
        if n + max_tokens > self.cloud.max_model_len:
            return error_response(400, f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                       f"context of {self.cloud.max_model_len} tokens",
                                  param="messages" if route == "chat" else "prompt")
        return None

    def _count_usage(self, request: web.Request, answer: CloudAnswer) -> None:
        if self.metrics is not None:
            self.metrics.on_openai_usage(request.path, answer.usage())

    # ------------------------------------------------------------------ helpers
    async def _parse(self, request: web.Request, model_cls, route: str):
        """(payload, request model) or an error response. Our own checks run first, on the raw
        JSON (so that every answer names the field); then vLLM's protocol model."""
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
            self._validate(payload, route)
        except InvalidOptions as exc:
            return error_response(400, str(exc), param=exc.param)
        # vLLM's model sees only the options we implement (the neutral rest were accepted above)
        try:
            req = model_cls.model_validate({k: x for k, x in payload.items() if k in SUPPORTED[route]})
        except ValidationError as exc:
            first = exc.errors()[0]
            return error_response(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}",
                                  param=str(first["loc"][0]) if first["loc"] else None)
        except Exception as exc:  # noqa: BLE001 - a vLLM validator raising outside pydantic's wrapping
            return error_response(400, str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                                  param=getattr(exc, "parameter", None))
        return payload, req

    def _validate(self, p: dict, route: str) -> None:
        for key in p:
            if not isinstance(key, str) or key not in SUPPORTED[route]:
                if key in NEUTRAL and any(_same(p[key], n) for n in NEUTRAL[key]):
                    continue
                raise InvalidOptions(str(key), f"unsupported option: {key!r} (DRAGON serves text, one "
                                     f"choice per request; options it cannot honour are refused, not ignored)")
        for key, value in p.items():  # every string valid Unicode (no lone surrogate), by field
            v.check_encodable(key, value)
        if route == "chat":
            _check_messages(p.get("messages"))
            if "max_completion_tokens" in p and p["max_completion_tokens"] is not None:
                if p.get("max_tokens") is not None:
                    raise InvalidOptions("max_tokens", "give max_tokens or max_completion_tokens, not both")
                v.check_max_tokens(p["max_completion_tokens"], self.max_tokens, "max_completion_tokens")
        else:
            prompt = p.get("prompt")
            if isinstance(prompt, list):
                if len(prompt) != 1 or not isinstance(prompt[0], str):
                    raise InvalidOptions("prompt", "exactly one text prompt per request is supported")
                p["prompt"] = prompt = prompt[0]
            if prompt is None:
                raise InvalidOptions("prompt", "prompt is required")
            v.check_text("prompt", prompt)
        if p.get("max_tokens") is not None:
            v.check_max_tokens(p["max_tokens"], self.max_tokens)
        if p.get("n") is not None and (isinstance(p["n"], bool) or p["n"] != 1):
            raise InvalidOptions("n", f"n must be 1 (one choice per request), got {p['n']!r}")
        if p.get("k") is not None:
            v.check_k(p["k"], self.max_k)
        if p.get("retrieval") is not None and not isinstance(p["retrieval"], bool):
            raise InvalidOptions("retrieval", "retrieval must be true or false")
        for key in ("stream",):
            if p.get(key) is not None and not isinstance(p[key], bool):
                raise InvalidOptions(key, f"{key} must be true or false")
        if p.get("stream_options") is not None and not isinstance(p["stream_options"], dict):
            raise InvalidOptions("stream_options", "stream_options must be an object")
        if p.get("user") is not None and not isinstance(p["user"], str):
            raise InvalidOptions("user", "user must be a string")
        v.check_sampling(temperature=p.get("temperature"), top_p=p.get("top_p"), top_k=p.get("top_k"),
                         seed=p.get("seed"))
        stop = p.get("stop")
        if stop is not None:
            stops = [stop] if isinstance(stop, str) else stop
            if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
                raise InvalidOptions("stop", "stop must be a string or a list of strings")
            if len(stops) > MAX_STOP:
                raise InvalidOptions("stop", f"at most {MAX_STOP} stop sequences")

    def _options(self, p: dict) -> dict[str, Any]:
        max_tokens = p.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = p.get("max_tokens")
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, self.max_tokens)
        stop = p.get("stop")
        stop = stop if isinstance(stop, list) else ([stop] if stop else [])
        top_k = p.get("top_k")
        retrieval = p.get("retrieval")
        return dict(max_tokens=int(max_tokens), temperature=p.get("temperature"), top_p=p.get("top_p"),
                    top_k=top_k if top_k and top_k > 0 else None, seed=p.get("seed"), stop=stop,
                    k=p.get("k"), retrieval=True if retrieval is None else retrieval)

    def _chat_body(self, answer: CloudAnswer, text: str) -> dict:
        return dict(id=answer.id("chatcmpl"), object="chat.completion", created=answer.created,
                    model=self.served_model,
                    choices=[dict(index=0, message=dict(role="assistant", content=text),
                                  finish_reason=answer.finish_reason, logprobs=None)],
                    usage=answer.usage(), dragon=answer.stats())

    def _completion_body(self, answer: CloudAnswer, text: str) -> dict:
        return dict(id=answer.id("cmpl"), object="text_completion", created=answer.created,
                    model=self.served_model,
                    choices=[dict(index=0, text=text, finish_reason=answer.finish_reason, logprobs=None)],
                    usage=answer.usage(), dragon=answer.stats())

    async def _stream(self, request: web.Request, answer: CloudAnswer, stops: list[str],
                      chat: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        kind, obj = ("chatcmpl", "chat.completion.chunk") if chat else ("cmpl", "text_completion")
        first = True

        async def send(payload: dict) -> None:
            data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
            await write_within(resp, data, self.write_timeout_s)

        try:
            async for delta in visible_deltas(answer, stops):
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


async def close_answer(answer: CloudAnswer) -> None:
    """Free the answer's streams and KV, even if this request is cancelled meanwhile: a client
    that leaves mid-stream makes the write fail (and the close start) and, a moment later, the
    disconnect watcher cancel the request, which would otherwise interrupt the close halfway
    and leave its streams open for good."""
    task = asyncio.ensure_future(answer.aclose())
    _closing.add(task)
    task.add_done_callback(_closing.discard)
    await asyncio.shield(task)


async def visible_deltas(answer: CloudAnswer, stops: list[str]) -> AsyncIterator[str]:
    """The answer's text deltas with the stop strings applied (``stop_text.releasable``): text
    that could be the start of a stop string is held back until the next text decides it, and
    the answer ends before the first stop string (finish_reason "stop")."""
    text, shown = "", 0
    async with aclosing(answer.deltas()) as deltas:
        async for piece in deltas:
            text += piece
            upto, stopped = stop_text.releasable(text, stops, shown)
            if upto > shown:
                yield text[shown:upto]
                shown = upto
            if stopped:
                answer.finish_reason = "stop"
                return
    if len(text) > shown:  # the held-back tail never became a stop string
        yield text[shown:]


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


def _same(value: Any, neutral: Any) -> bool:
    """Equal and of the same kind (``False`` is not ``0`` here, nor ``1.0`` ``True``)."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return isinstance(value, bool) and isinstance(neutral, bool) and value == neutral
    return type(value) in (type(neutral), int, float) and value == neutral if neutral is not None else value is None


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise InvalidOptions("messages", "messages is required")
    if not isinstance(messages, list) or not messages:
        raise InvalidOptions("messages", "messages must be a non-empty list")
    has_user, total = False, 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidOptions("messages", f"messages[{i}] must be an object")
        role, content = msg.get("role"), msg.get("content")
        if role not in ("system", "developer", "user", "assistant"):
            raise InvalidOptions("messages", f"messages[{i}].role must be system, user or assistant, got {role!r}"
                                 if isinstance(role, (str, type(None))) else f"messages[{i}].role must be a string")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidOptions("messages", f"messages[{i}].content: only text parts are supported")
            text = " ".join(part["text"] for part in content)
        elif isinstance(content, str):
            text = content
        elif content is None and role == "assistant":
            text = ""
        else:
            raise InvalidOptions("messages", f"messages[{i}].content must be a string or a list of text parts")
        extra = set(msg) - {"role", "content", "name"}
        if extra:
            raise InvalidOptions("messages", f"messages[{i}]: unsupported field(s) {sorted(extra)} (tools are not supported)")
        if len(text) > v.MAX_QUERY_CHARS:
            raise InvalidOptions("messages", f"messages[{i}].content is longer than {v.MAX_QUERY_CHARS} characters")
        total += len(text)
        if total > v.MAX_QUERY_CHARS:  # a cap before tokenising, for the whole conversation too
            raise InvalidOptions("messages", f"messages are longer than {v.MAX_QUERY_CHARS} characters in all")
        has_user = has_user or (role == "user" and bool(text))
    if not has_user:
        raise InvalidOptions("messages", "messages must contain a non-empty user message")
