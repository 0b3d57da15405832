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
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from dragon_core import validation as v
from dragon_core.errors import InvalidOptions
from dragon_vllm import vllm_compat as vc
from dragon_vllm.backend import CloudAnswer, DragonCloud

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


def error_response(status: int, message: str, err_type: str = "invalid_request_error",
                   param: str | None = None) -> web.Response:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return web.json_response(body, status=status)


class OpenAIRoutes:
    def __init__(self, cloud: DragonCloud, served_model: str, *, max_tokens: int | None = None,
                 max_k: int | None = None) -> None:
        from dragon_vllm.link import LinkLimits

        self.cloud = cloud
        self.served_model = served_model
        # the server's caps: the link's by default (the context length bounds max_tokens further)
        self.max_tokens = max_tokens or min(LinkLimits().max_tokens, max(1, cloud.max_model_len - 1))
        self.max_k = max_k or LinkLimits().max_k

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)

    # ------------------------------------------------------------------ routes
    async def models(self, request: web.Request) -> web.Response:
        card = vc.ModelCard(id=self.served_model, owned_by="dragon", max_model_len=self.cloud.max_model_len)
        return web.json_response(vc.ModelList(data=[card]).model_dump())

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = await self._parse(request, vc.ChatCompletionRequest, "chat")
        if isinstance(req, web.Response):
            return req
        payload, req = req
        try:
            answer = await self.cloud.answer_chat(payload["messages"], **self._options(payload))
        except InvalidOptions as exc:
            return error_response(400, str(exc), param=exc.param)
        except ValueError as exc:
            return error_response(400, str(exc))
        if req.stream:
            return await self._stream(request, answer, chat=True)
        text = await answer.text()
        return web.json_response(self._chat_body(answer, text))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = await self._parse(request, vc.CompletionRequest, "completions")
        if isinstance(req, web.Response):
            return req
        payload, req = req
        try:
            answer = await self.cloud.answer_text(payload["prompt"], **self._options(payload))
        except InvalidOptions as exc:
            return error_response(400, str(exc), param=exc.param)
        except ValueError as exc:
            return error_response(400, str(exc))
        if req.stream:
            return await self._stream(request, answer, chat=False)
        text = await answer.text()
        return web.json_response(self._completion_body(answer, text))

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

    async def _stream(self, request: web.Request, answer: CloudAnswer, chat: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        kind, obj = ("chatcmpl", "chat.completion.chunk") if chat else ("cmpl", "text_completion")
        first = True
        try:
            async for delta in answer.deltas():
                if chat:
                    d = {"content": delta}
                    if first:
                        d["role"], first = "assistant", False
                    choice = dict(index=0, delta=d, finish_reason=None)
                else:
                    choice = dict(index=0, text=delta, finish_reason=None)
                await _sse(resp, dict(id=answer.id(kind), object=obj, created=answer.created,
                                      model=self.served_model, choices=[choice]))
            last = dict(index=0, delta={}, finish_reason=answer.finish_reason) if chat else \
                dict(index=0, text="", finish_reason=answer.finish_reason)
            await _sse(resp, dict(id=answer.id(kind), object=obj, created=answer.created, model=self.served_model,
                                  choices=[last], usage=answer.usage(), dragon=answer.stats()))
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, ConnectionError):
            log.info("client went away mid-stream; answer cancelled")
        finally:
            await answer.aclose()
        return resp


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
    has_user = False
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
        has_user = has_user or (role == "user" and bool(text))
    if not has_user:
        raise InvalidOptions("messages", "messages must contain a non-empty user message")


async def _sse(resp: web.StreamResponse, payload: dict) -> None:
    await resp.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")
