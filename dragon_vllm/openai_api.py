"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Requests are parsed and validated with vLLM's own OpenAI protocol models and answered in
OpenAI's shapes (errors included). Each answer is cloud-side RAG with output aggregation: the
top-k public passages, one vLLM stream per passage, mixed by retrieval score (a solo cloud
``Session``: the same code path as DRAGON, with no device). Two extra request fields:
``k`` (passages, default from the server) and ``retrieval`` (false: a plain model server).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from aiohttp import web
from pydantic import ValidationError

from dragon_vllm import vllm_compat as vc
from dragon_vllm.backend import CloudAnswer, DragonCloud

log = logging.getLogger("dragon.cloud.api")


def error_response(status: int, message: str, err_type: str = "invalid_request_error",
                   param: str | None = None) -> web.Response:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return web.json_response(body, status=status)


class OpenAIRoutes:
    def __init__(self, cloud: DragonCloud, served_model: str) -> None:
        self.cloud = cloud
        self.served_model = served_model

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)

    # ------------------------------------------------------------------ routes
    async def models(self, request: web.Request) -> web.Response:
        card = vc.ModelCard(id=self.served_model, owned_by="dragon", max_model_len=self.cloud.max_model_len)
        return web.json_response(vc.ModelList(data=[card]).model_dump())

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = await self._parse(request, vc.ChatCompletionRequest)
        if isinstance(req, web.Response):
            return req
        messages = [m if isinstance(m, dict) else dict(m) for m in req.messages]
        try:
            answer = await self.cloud.answer_chat(messages, **self._options(req))
        except ValueError as exc:
            return error_response(400, str(exc))
        if req.stream:
            return await self._stream(request, answer, chat=True)
        text = await answer.text()
        return web.json_response(self._chat_body(answer, text))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = await self._parse(request, vc.CompletionRequest)
        if isinstance(req, web.Response):
            return req
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                return error_response(400, "exactly one text prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            return error_response(400, "prompt must be a non-empty string", param="prompt")
        try:
            answer = await self.cloud.answer_text(prompt, **self._options(req))
        except ValueError as exc:
            return error_response(400, str(exc))
        if req.stream:
            return await self._stream(request, answer, chat=False)
        text = await answer.text()
        return web.json_response(self._completion_body(answer, text))

    # ------------------------------------------------------------------ helpers
    async def _parse(self, request: web.Request, model_cls):
        try:
            payload = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "request body is not valid JSON")
        if not isinstance(payload, dict):
            return error_response(400, "request body must be a JSON object")
        try:
            req = model_cls.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            return error_response(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}",
                                  param=str(first["loc"][0]) if first["loc"] else None)
        if req.model not in (None, "", self.served_model):
            return error_response(404, f"The model `{req.model}` does not exist.", "NotFoundError", "model")
        if (getattr(req, "n", 1) or 1) != 1:
            return error_response(400, "n > 1 is not supported", param="n")
        return req

    def _options(self, req) -> dict[str, Any]:
        extra = req.model_extra or {}
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or 128
        stop = req.stop if isinstance(req.stop, list) else ([req.stop] if req.stop else [])
        return dict(max_tokens=int(max_tokens), temperature=req.temperature, top_p=req.top_p,
                    top_k=getattr(req, "top_k", None), seed=req.seed, stop=stop,
                    k=extra.get("k"), retrieval=extra.get("retrieval", True))

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


async def _sse(resp: web.StreamResponse, payload: dict) -> None:
    await resp.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")
