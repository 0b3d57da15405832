"""The rules for request options, written once for every entrance: the OpenAI routes, the
link's ``Open`` and the device's ``AnswerOptions`` (SDK and CLI). Pure functions, no I/O: each
raises ``InvalidOptions`` (with ``param`` naming the field and a one-line message) or returns.

Ranges are OpenAI's where it defines them: ``temperature`` in [0, 2], ``top_p`` in (0, 1],
``max_tokens`` >= 1 (and <= the server's cap), ``n`` = 1. ``top_k``: 0 or -1 = off, else >= 1.
"""

from __future__ import annotations

import math
from typing import Any

from dragon_core.errors import InvalidOptions

SEED_BOUND = 2**63  # seeds are int64 on the wire
MAX_TOP_K = 1 << 24  # far above any vocabulary: a bound on the type, not a tuning knob
MAX_DEPTH = 1024  # draft depth cap of the speculative scheduler
MAX_QUERY_CHARS = 100_000  # a query is a question, not a document


def check_int(param: str, value: Any, lo: int, hi: int | None = None) -> int:
    """An integer (not a bool, not a float) in ``lo..hi``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOptions(param, f"{param} must be an integer, got {_show(value)}")
    if value < lo or (hi is not None and value > hi):
        bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise InvalidOptions(param, f"{param}={value} is outside {bound}")
    return value


def check_number(param: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidOptions(param, f"{param} must be a number, got {_show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidOptions(param, f"{param} must be finite, got {value}")
    return value


def check_max_tokens(value: Any, cap: int, param: str = "max_tokens") -> int:
    return check_int(param, value, 1, cap)


def check_k(value: Any, cap: int, param: str = "k", lo: int = 1) -> int:
    return check_int(param, value, lo, cap)


def check_temperature(value: Any, param: str = "temperature") -> float:
    t = check_number(param, value)
    if not 0.0 <= t <= 2.0:
        raise InvalidOptions(param, f"{param}={t} is outside [0, 2]")
    return t


# Below this an OpenAI ``temperature`` means greedy decoding, as it does inside vLLM (its
# sampling epsilon): ``log_softmax(z / T)`` overflows for T near 0 (the fuzz test's T = 1.2e-38
# gave a NaN distribution and an answer that never came), and no sampler can tell T = 1e-6 from
# the argmax anyway.
GREEDY_BELOW = 1e-5


def temperature_is_greedy(temperature: float | None) -> bool:
    """The OpenAI reading: unset, 0, or below ``GREEDY_BELOW`` is greedy decoding."""
    return temperature is None or temperature < GREEDY_BELOW


def check_sampling_temperature(greedy: bool, temperature: Any, param: str = "temperature") -> None:
    """Sampling needs a temperature of at least ``GREEDY_BELOW``: below it (0 included) is greedy
    decoding, said with ``greedy=true`` (the one way both sides read it)."""
    if not greedy and temperature_is_greedy(temperature):
        raise InvalidOptions(param, f"{param}={temperature} with greedy=false: a temperature below "
                                    f"{GREEDY_BELOW:g} means greedy decoding, set greedy=true")


def check_top_p(value: Any, param: str = "top_p") -> float:
    p = check_number(param, value)
    if not 0.0 < p <= 1.0:
        raise InvalidOptions(param, f"{param}={p} is outside (0, 1]")
    return p


def check_top_k(value: Any, param: str = "top_k") -> int:
    """0 or -1: off (the whole vocabulary); else the k most likely tokens, k >= 1."""
    return check_int(param, value, -1, MAX_TOP_K)


def check_seed(value: Any, param: str = "seed") -> int:
    return check_int(param, value, -SEED_BOUND, SEED_BOUND - 1)


def check_text(param: str, value: Any, max_chars: int = MAX_QUERY_CHARS, allow_empty: bool = False) -> str:
    """A string that is valid Unicode (no lone surrogates: it must encode to UTF-8), not empty
    unless allowed, and at most ``max_chars`` characters."""
    if not isinstance(value, str):
        raise InvalidOptions(param, f"{param} must be a string, got {_show(value)}")
    if not value and not allow_empty:
        raise InvalidOptions(param, f"{param} must not be empty")
    if len(value) > max_chars:
        raise InvalidOptions(param, f"{param} is {len(value)} characters, more than the limit of {max_chars}")
    check_encodable(param, value)
    return value


def check_encodable(param: str, value: Any) -> None:
    """Every string inside ``value`` (dicts and lists walked) encodes to UTF-8."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidOptions(param, f"{param} contains invalid Unicode (a lone surrogate)") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)


def check_sampling(*, temperature: Any = None, top_p: Any = None, top_k: Any = None, seed: Any = None) -> None:
    """The shared sampling fields; ``None`` means "not given" (the default applies)."""
    if temperature is not None:
        check_temperature(temperature)
    if top_p is not None:
        check_top_p(top_p)
    if top_k is not None:
        check_top_k(top_k)
    if seed is not None:
        check_seed(seed)


def check_request(*, max_tokens: Any, max_tokens_cap: int, k: Any = None, max_k: int = 16, k_lo: int = 1,
                  temperature: Any = None, top_p: Any = None, top_k: Any = None, seed: Any = None) -> None:
    """The fields every entrance shares: length, passages and sampling."""
    check_max_tokens(max_tokens, max_tokens_cap)
    if k is not None:
        check_k(k, max_k, lo=k_lo)
    check_sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)


def check_prior(prior: Any, param: str = "prior") -> None:
    """Scheduler estimates: finite, non-negative timings; acceptance rates in [0, 1]."""
    for name in ("device_ms", "cloud_ms", "rtt_ms"):
        x = check_number(f"{param}.{name}", getattr(prior, name))
        if x < 0:
            raise InvalidOptions(f"{param}.{name}", f"{param}.{name}={x} must be >= 0")
    for name in ("alpha_device", "alpha_cloud"):
        x = check_number(f"{param}.{name}", getattr(prior, name))
        if not 0.0 <= x <= 1.0:
            raise InvalidOptions(f"{param}.{name}", f"{param}.{name}={x} is outside [0, 1]")


def _show(value: Any) -> str:
    text = repr(value)
    return (text[:40] + "...") if len(text) > 43 else text


MAX_CONCORD_TOP_M = 4096  # concord_wire.MAX_TOP_M: the codec's bound on Open.concord_top_m


def check_concord(mode: Any, greedy: Any, debt_max: Any, top_m: Any) -> None:
    """CONCORD's settings (docs/CONCORD.md): ``concord_debt_max`` a number, ``inf`` and ``-inf``
    allowed (always / never wait for the cloud), NaN not; ``concord_top_m`` in 0..4096; and mode
    ``concord`` certifies greedy tokens only, so sampling is refused before anything starts."""
    if isinstance(debt_max, bool) or not isinstance(debt_max, (int, float)) or math.isnan(debt_max):
        raise InvalidOptions("concord_debt_max", f"concord_debt_max must be a number (inf and -inf allowed), "
                                                 f"got {_show(debt_max)}")
    check_int("concord_top_m", top_m, 0, MAX_CONCORD_TOP_M)
    if mode == "concord" and greedy is not True:
        raise InvalidOptions("temperature", "mode concord certifies greedy tokens; sampling (temperature > 0) "
                                            "is not supported: use temperature 0 or another mode")


ITERATIVE_MODES = ("dragon", "vdrag", "sw", "cloud")  # modes whose documents feed streams step by step


def check_retrieve_every(mode: Any, every: Any) -> None:
    """Iterative retrieval (dragon_core.iterative): ``retrieve_every`` in 0..4096 tokens, and only
    in the modes whose sides decode over their documents step by step (not DRCG's one prompt,
    not CONCORD, whose evidence names one retrieval mass per request)."""
    from dragon_core.iterative import MAX_RETRIEVE_EVERY

    check_int("retrieve_every", every, 0, MAX_RETRIEVE_EVERY)
    if every and mode not in ITERATIVE_MODES:
        raise InvalidOptions("retrieve_every", f"retrieve_every needs mode {', '.join(ITERATIVE_MODES)}; "
                                               f"mode {mode} retrieves once")
