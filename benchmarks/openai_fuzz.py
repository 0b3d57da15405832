"""Fuzzed OpenAI request bodies (hypothesis) and the rule a server must obey with them.

A body is a valid request with some fields replaced by random values: in range, out of range,
of the wrong type, NaN/infinity, lone surrogates, unknown options. ``in_range`` says whether
every field is one the server must accept (OpenAI's ranges and DRAGON's caps); the rule is:
never a 5xx, never a hang, and a body with any out-of-range field never gets a 2xx (it would
be accepted silently). In-range bodies are kept cheap to serve (``max_tokens`` <= 3).
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dragon_http.request import DEFAULT_MAX_TOKENS

MODEL = "smollm2-135m"
MAX_K = 16
SEED_BOUND = 2**63
MAX_TOP_K = 1 << 24
MAX_TOKENS = 1024  # dragon-cloud serve's default --max-tokens cap
NEUTRAL = {"logprobs": False, "presence_penalty": 0, "frequency_penalty": 0, "echo": False, "best_of": 1}

_junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 1, 2, 3, 16, 17, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 2.0001, -0.0]),
    st.text(max_size=6), st.sampled_from(["\ud800", "1", "", "true"]),
    st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))

def _either(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Half the time a value in range, half the time junk (``a | b`` would flatten the junk's
    many branches next to ``a`` and make valid values rare)."""
    return st.booleans().flatmap(lambda ok: valid if ok else _junk)


FIELDS: dict[str, Any] = {
    "model": _either(st.sampled_from([MODEL, "", "gpt-9"])),
    "max_tokens": _either(st.integers(1, 3)),
    "temperature": _either(st.floats(0, 2)),
    "top_p": _either(st.floats(0, 1, exclude_min=True)),
    "top_k": _either(st.integers(-1, 50)),
    "n": _either(st.just(1)),
    "seed": _either(st.integers(-(2**63), 2**63 - 1)),
    "k": _either(st.integers(1, 3)),
    "stream": _either(st.booleans()),
    "retrieval": _either(st.booleans()),
    "stop": _either(st.text(max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=5)),
    "logprobs": _either(st.just(False)),
    "presence_penalty": _either(st.just(0)),
    "unknown_option": _junk,
}
_content = _either(st.sampled_from(["What is Lyon famous for?", "", "caf\ud800", "Lyon " * 3]))
_message = st.fixed_dictionaries({"role": _either(st.sampled_from(["user", "system", "assistant", "wizard"])),
                                  "content": _content})
_question = [{"role": "user", "content": "What is Lyon famous for?"}]


@st.composite
def bodies(draw) -> tuple[str, dict]:
    """``(route, body)``: a valid request of either route, with 1-4 fields fuzzed."""
    route = draw(st.sampled_from(["chat", "completions"]))
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 2, "temperature": 0}
    if route == "chat":
        body["messages"] = draw(st.sampled_from(["kept", "fuzzed"]).flatmap(
            lambda how: st.just(_question) if how == "kept" else _either(st.lists(_message, min_size=1, max_size=2))))
    else:
        body["prompt"] = draw(st.sampled_from(["kept", "fuzzed"]).flatmap(
            lambda how: st.just("The capital of France is") if how == "kept" else _either(st.lists(_content, max_size=2))
            | _content))
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=4, unique=True)):
        body[name] = draw(FIELDS[name])
    return route, body


def in_range(route: str, body: dict) -> bool:
    """Whether the server must accept ``body`` (every field in range and of the right type)."""
    checks = {
        "model": lambda x: x in (None, "", MODEL),
        "max_tokens": lambda x: x is None or (_int(x) and 1 <= x <= MAX_TOKENS),
        "temperature": lambda x: x is None or (_num(x) and 0 <= x <= 2),
        "top_p": lambda x: x is None or (_num(x) and 0 < x <= 1),
        "top_k": lambda x: x is None or (_int(x) and -1 <= x <= MAX_TOP_K),
        "n": lambda x: x is None or (_num(x) and x == 1),
        "seed": lambda x: x is None or (_int(x) and -SEED_BOUND <= x < SEED_BOUND),
        "k": lambda x: x is None or (_int(x) and 1 <= x <= MAX_K),
        "stream": lambda x: x is None or isinstance(x, bool),
        "retrieval": lambda x: x is None or isinstance(x, bool),
        "stop": _stop_ok,
        "logprobs": lambda x: x is None or x is False,
        "presence_penalty": lambda x: x is None or (_num(x) and x == 0),
        "unknown_option": lambda x: False,
        "messages": _messages_ok,
        "prompt": _prompt_ok,
    }
    return all(checks[name](value) for name, value in body.items())


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _text_ok(x: Any) -> bool:
    return isinstance(x, str) and bool(x) and _encodable(x)


def _encodable(x: str) -> bool:
    try:
        x.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _stop_ok(x: Any) -> bool:
    if x is None or (isinstance(x, str) and _encodable(x)):
        return True
    return isinstance(x, list) and len(x) <= 4 and all(isinstance(s, str) and _encodable(s) for s in x)


def _messages_ok(msgs: Any) -> bool:
    if not isinstance(msgs, list) or not msgs:
        return False
    for msg in msgs:
        if not isinstance(msg, dict) or msg.get("role") not in ("user", "system", "assistant"):
            return False
        content = msg.get("content")
        if content is None and msg["role"] == "assistant":  # OpenAI allows it (a turn of tool calls)
            continue
        if not isinstance(content, str) or not _encodable(content):
            return False
    return any(m["role"] == "user" and m["content"] for m in msgs)


def _prompt_ok(p: Any) -> bool:
    if isinstance(p, list):
        return len(p) == 1 and _text_ok(p[0])
    return _text_ok(p)


# A fuzzed body may leave ``max_tokens`` out (or set it to None): then the server's default
# (128) applies, and on two loaded cores such an answer alone can take tens of seconds. The
# deadline for a "hang" grows with the tokens the answer may legitimately take.
PER_TOKEN_S = 0.5


def _answer_tokens(body: dict) -> int:
    value = body.get("max_tokens")
    return value if _int(value) and 1 <= value <= MAX_TOKENS else DEFAULT_MAX_TOKENS


def fuzz_server(port: int, key: str | None, examples: int, timeout_s: float = 30.0) -> tuple[Counter, list]:
    """Send ``examples`` fuzzed bodies to a real server (one connection each); returns counts
    (``tried``, ``in range -> 200``..., and the violations ``5xx``, ``hang``, ``silent``) and
    the first few violating bodies. Hypothesis draws the bodies; violations are counted, not
    raised, so that every example runs and the counts are complete."""
    from benchmarks.abuse_kit import post_json

    seen: Counter = Counter()
    bad: list = []
    paths = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=bodies())
    def one(case: tuple[str, dict]) -> None:
        route, body = case
        valid = in_range(route, body)
        try:
            limit = timeout_s + PER_TOKEN_S * _answer_tokens(body)  # a long legit answer is not a hang
            reply = asyncio.run(asyncio.wait_for(post_json(port, paths[route], body, key), limit))
            status = reply.status
        except TimeoutError:
            status = "hang"
        seen["tried"] += 1
        seen[f"{'in' if valid else 'out of'} range -> {status}"] += 1
        violation = ("hang" if status == "hang" else "5xx" if status is None or status >= 500
                     else "silent" if not valid and status < 400 else None)
        if violation:
            seen[violation] += 1
            if len(bad) < 10:
                bad.append((violation, route, body))

    one()
    return seen, bad
