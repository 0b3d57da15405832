"""The cloud's OpenAI-compatible routes: ``dragon_http``'s routes over ``DragonCloud``.

Each answer is cloud-side RAG with output aggregation: the top-k public passages, one vLLM
stream per passage, mixed by retrieval score (a solo cloud ``Session``: the same code path as
DRAGON, with no device). Two extra request fields: ``k`` (passages, default from the server)
and ``retrieval`` (false: a plain model server).

What the cloud adds to the shared routes (``dragon_http.openai_routes``): its caps (the link's,
bounded by the context), vLLM's own OpenAI protocol models as a last check of every request
and for ``/v1/models``, and the usage metrics.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

from dragon_core import validation as v
from dragon_core.errors import InvalidOptions
from dragon_http import request as rq
from dragon_http.errors import error_response
from dragon_http.guard import DEFAULT_BODY_TIMEOUT_S
from dragon_http.openai_routes import OpenAIRoutes as SharedRoutes
from dragon_vllm import vllm_compat as vc
from dragon_vllm.backend import DragonCloud
from dragon_vllm.metrics import CloudMetrics

_REQUEST_MODELS = {"chat": vc.ChatCompletionRequest, "completions": vc.CompletionRequest}


class CloudExtras:
    """The cloud's DRAGON fields: ``k`` public passages, ``retrieval`` on or off."""

    names = frozenset({"k", "retrieval"})

    def __init__(self, max_k: int) -> None:
        self.max_k = max_k

    def check(self, p: dict) -> None:
        if p.get("k") is not None:
            v.check_k(p["k"], self.max_k)
        if p.get("retrieval") is not None and not isinstance(p["retrieval"], bool):
            raise InvalidOptions("retrieval", "retrieval must be true or false")

    def options(self, p: dict) -> dict[str, Any]:
        retrieval = p.get("retrieval")
        return dict(k=p.get("k"), retrieval=True if retrieval is None else retrieval)


class OpenAIRoutes(SharedRoutes):
    def __init__(self, cloud: DragonCloud, served_model: str, *, max_tokens: int | None = None,
                 max_k: int | None = None, metrics: CloudMetrics | None = None,
                 write_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        from dragon_vllm.link import LinkLimits

        # the server's caps: the link's by default (the context length bounds max_tokens further)
        max_tokens = max_tokens or min(LinkLimits().max_tokens, max(1, cloud.max_model_len - 1))
        super().__init__(cloud, served_model, max_tokens=max_tokens, extras=CloudExtras(max_k or LinkLimits().max_k),
                         on_usage=metrics.on_openai_usage if metrics is not None else None,
                         write_timeout_s=write_timeout_s)
        self.cloud = cloud

    def model_list(self) -> dict:
        card = vc.ModelCard(id=self.served_model, owned_by="dragon", max_model_len=self.cloud.max_model_len)
        return vc.ModelList(data=[card]).model_dump()

    def protocol_check(self, payload: dict, route: str) -> web.Response | None:
        """vLLM's protocol model sees only the options we implement (the neutral rest were
        accepted by our own checks, which ran first so that every answer names the field)."""
        fields = rq.supported(route, self.extras)
        try:
            _REQUEST_MODELS[route].model_validate({k: x for k, x in payload.items() if k in fields})
        except ValidationError as exc:
            first = exc.errors()[0]
            return error_response(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}",
                                  param=str(first["loc"][0]) if first["loc"] else None)
        except Exception as exc:  # noqa: BLE001 - a vLLM validator raising outside pydantic's wrapping
            return error_response(400, str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                                  param=getattr(exc, "parameter", None))
        return None
