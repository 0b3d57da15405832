"""An OpenAI request, parsed and validated before any work, the same way on both servers.

Every field is checked (``dragon_core.validation``: the rules the link and the device's SDK
share): out-of-range, wrong-typed or non-UTF-8 values, and any OpenAI option we do not
implement (``logprobs``, ``tools``, ``response_format``, penalties, ...), raise
``InvalidOptions`` naming the field (the routes answer a 400 in OpenAI's shape); nothing is
silently ignored. An option at its neutral value (``logprobs: false``, ``presence_penalty: 0``,
``n: 1``...) is accepted.

DRAGON's own request fields differ per runtime (the cloud: ``k``, ``retrieval``; the device:
``mode``, ``k``, ``cloud_k``, ``aggregator``...): a ``RequestExtras`` names, checks and converts
them.
"""

from __future__ import annotations

from typing import Any, Protocol

from dragon_core import validation as v
from dragon_core.errors import InvalidOptions

# OpenAI options we implement, per route (``user`` is metadata; ``stream_options``: the last
# chunk always carries ``usage``). A runtime's extras are added to these.
_COMMON = frozenset({"model", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream",
                     "stream_options", "user"})
OPENAI_FIELDS = {"chat": _COMMON | {"messages", "max_completion_tokens"}, "completions": _COMMON | {"prompt"}}
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


class RequestExtras(Protocol):
    """DRAGON's extra request fields for one runtime."""

    names: frozenset[str]

    def check(self, payload: dict) -> None:
        """``InvalidOptions`` for a bad extra field (the payload's OpenAI fields are valid)."""
        ...

    def options(self, payload: dict) -> dict[str, Any]:
        """The backend's keyword arguments for the extra fields."""
        ...


def supported(route: str, extras: RequestExtras) -> frozenset[str]:
    return OPENAI_FIELDS[route] | extras.names


def validate(p: dict, route: str, max_tokens_cap: int, extras: RequestExtras) -> None:
    """Raises ``InvalidOptions`` for the first bad field; normalises a one-element prompt list."""
    fields = supported(route, extras)
    for key in p:
        if not isinstance(key, str) or key not in fields:
            if key in NEUTRAL and any(_same(p[key], n) for n in NEUTRAL[key]):
                continue
            raise InvalidOptions(str(key), f"unsupported option: {key!r} (DRAGON serves text, one "
                                 f"choice per request; options it cannot honour are refused, not ignored)")
    for key, value in p.items():  # every string valid Unicode (no lone surrogate), by field
        v.check_encodable(key, value)
    if route == "chat":
        check_messages(p.get("messages"))
        if "max_completion_tokens" in p and p["max_completion_tokens"] is not None:
            if p.get("max_tokens") is not None:
                raise InvalidOptions("max_tokens", "give max_tokens or max_completion_tokens, not both")
            v.check_max_tokens(p["max_completion_tokens"], max_tokens_cap, "max_completion_tokens")
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
        v.check_max_tokens(p["max_tokens"], max_tokens_cap)
    if p.get("n") is not None and (isinstance(p["n"], bool) or p["n"] != 1):
        raise InvalidOptions("n", f"n must be 1 (one choice per request), got {p['n']!r}")
    extras.check(p)
    if p.get("stream") is not None and not isinstance(p["stream"], bool):
        raise InvalidOptions("stream", "stream must be true or false")
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


def options(p: dict, max_tokens_cap: int, extras: RequestExtras) -> dict[str, Any]:
    """The backend's keyword arguments for a validated request (``stop`` included: the backend's
    answer stream applies it)."""
    max_tokens = p.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = p.get("max_tokens")
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, max_tokens_cap)
    stop = p.get("stop")
    stop = stop if isinstance(stop, list) else ([stop] if stop else [])
    top_k = p.get("top_k")
    return dict(max_tokens=int(max_tokens), temperature=p.get("temperature"), top_p=p.get("top_p"),
                top_k=top_k if top_k and top_k > 0 else None, seed=p.get("seed"), stop=stop, **extras.options(p))


def check_messages(messages: Any) -> None:
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


def _same(value: Any, neutral: Any) -> bool:
    """Equal and of the same kind (``False`` is not ``0`` here, nor ``1.0`` ``True``)."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return isinstance(value, bool) and isinstance(neutral, bool) and value == neutral
    return type(value) in (type(neutral), int, float) and value == neutral if neutral is not None else value is None
